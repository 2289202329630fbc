"""The vision-language rewards (HPSv3, UnifiedReward-2.0) on tiny random checkpoints in the published layouts: loading,
the published prompt and preprocessing constants, the score against an independent forward pass, answer parsing,
and the named errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen2VLModel

from diffusion_dpo_trainer.rewards import load_reward
from diffusion_dpo_trainer.rewards.hpsv3 import HPSv3, resize_for_hpsv3, smart_resize
from diffusion_dpo_trainer.rewards.unifiedreward import UnifiedReward, UnparseableAnswerError, parse_answer
from diffusion_dpo_trainer.testing import make_hpsv3_model, make_unifiedreward_model

PROMPTS = ["a red square", "a photo of a cat", "the blue circle"]


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (96, 48), (40, 72)]  # (width, height): square, landscape, portrait
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    return make_hpsv3_model(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture(scope="module")
def hpsv3(hpsv3_files):
    checkpoint, base = hpsv3_files
    return HPSv3(checkpoint, base=base, dtype=torch.float32)


# ---------------------------------------------------------------- HPSv3

def test_hpsv3_constants_are_the_published_ones(hpsv3):
    from diffusion_dpo_trainer.rewards import hpsv3 as module

    assert (module.HPSV3_REPO, module.HPSV3_FILE, module.BASE_MODEL) == ("MizzenAI/HPSv3", "HPSv3.safetensors",
                                                                         "Qwen/Qwen2-VL-7B-Instruct")
    assert module.IMAGE_PIXELS == 200704 and module.IMAGE_FACTOR == 28  # HPSv3_7B.yaml: min = max = 256 * 28 * 28
    assert module.REWARD_PROMPT == "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    assert module.INSTRUCTION.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality")
    assert module.INSTRUCTION.endswith("Textual prompt - {text_prompt}\n\n\n")
    processor = hpsv3.image_processor
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert tuple(processor.image_mean) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(processor.image_std) == (0.26862954, 0.26130258, 0.27577711)


def test_smart_resize_by_hand():
    assert smart_resize(1024, 1024) == (448, 448)  # 448^2 = 200704 exactly
    # 512x768 rounds to 504x756 (too many pixels): beta = sqrt(512*768/200704) = 1.3997 -> floor to 28s: 364 x 532.
    assert smart_resize(512, 768) == (364, 532)
    assert smart_resize(64, 64) == (448, 448)  # too few: beta = 7, 64 * 7 = 448
    assert resize_for_hpsv3(Image.new("RGB", (768, 512))).size == (532, 364)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300)


def test_hpsv3_inputs_are_the_reference_prompt_and_pixels(hpsv3):
    image = images(1)[0]
    inputs = hpsv3.preprocess([image], ["a cat"])
    tokenizer = hpsv3.tokenizer
    ids = inputs["input_ids"][0]
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((ids == image_token).sum()) == 256  # 448 x 448 -> 32 x 32 patches -> 16 x 16 merged
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert torch.equal(inputs["mm_token_type_ids"][0], (ids == image_token).int())
    text = tokenizer.decode(ids[ids != image_token])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|vision_end|>\nYou are tasked with evaluating")
    assert "Textual prompt - a cat\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>" in text
    assert text.endswith("END\n<|im_end|>\n<|im_start|>assistant\n")
    # The first patch: the bicubic 448 x 448 image's top-left 14 x 14, normalised with CLIP's mean/std, in both
    # temporal slots (a still image is repeated).
    array = np.asarray(image.resize((448, 448), Image.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = torch.from_numpy(((array[:14, :14] - mean) / std).transpose(2, 0, 1)).float()
    patch = inputs["pixel_values"][0].view(3, 2, 14, 14)
    torch.testing.assert_close(patch[:, 0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(patch[:, 1], expected, atol=1e-5, rtol=0)


def test_hpsv3_score_is_the_heads_mean_at_the_reward_token(hpsv3, hpsv3_files):
    checkpoint, base = hpsv3_files
    state = load_file(checkpoint)
    config = AutoConfig.from_pretrained(base)
    config.text_config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    backbone = Qwen2VLModel(config).eval()
    backbone.visual.load_state_dict({k.removeprefix("visual."): v.float() for k, v in state.items()
                                     if k.startswith("visual.")})
    backbone.language_model.load_state_dict({k.removeprefix("model."): v.float() for k, v in state.items()
                                             if k.startswith("model.")})
    batch = images()
    scores = hpsv3(batch, PROMPTS)
    expected = []
    for image, prompt in zip(batch, PROMPTS):
        inputs = hpsv3.preprocess([image], [prompt])
        with torch.no_grad():
            hidden = backbone(**inputs).last_hidden_state[0]
        h = hidden[inputs["input_ids"][0] == hpsv3.tokenizer.convert_tokens_to_ids("<|Reward|>")][0]
        h = F.relu(F.linear(h, state["rm_head.0.weight"], state["rm_head.0.bias"]))
        h = F.relu(F.linear(h, state["rm_head.3.weight"], state["rm_head.3.bias"]))
        expected.append(F.linear(h, state["rm_head.5.weight"], state["rm_head.5.bias"])[0].item())  # mu, not sigma
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert len(set(scores)) == 3
    # One image at a time or in a padded batch: the same score.
    np.testing.assert_allclose(hpsv3(batch[1:2], PROMPTS[1:2]), scores[1:2], rtol=1e-4, atol=1e-4)


def test_load_reward_hpsv3_by_name_and_path(hpsv3_files):
    checkpoint, base = hpsv3_files
    reward = load_reward(f"hpsv3:{checkpoint}", base=base)
    assert isinstance(reward, HPSv3)
    assert reward.dtype == torch.bfloat16 and reward.model.rm_head[0].weight.dtype == torch.float32  # as the reference
    assert len(reward(images(1), ["a cat"])) == 1


def test_hpsv3_refuses_a_foreign_checkpoint_and_names_non_finite_scores(hpsv3_files, tmp_path):
    checkpoint, base = hpsv3_files
    state = load_file(checkpoint)
    wrong = dict(state)
    wrong["model.embed_tokens.weight"] = wrong["model.embed_tokens.weight"][:-1]  # no row for <|Reward|>
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="not an HPSv3 checkpoint"):
        HPSv3(str(tmp_path / "wrong.safetensors"), base=base)
    missing = {k: v for k, v in state.items() if k != "rm_head.5.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="does not fit the Qwen2-VL architecture"):
        HPSv3(str(tmp_path / "missing.safetensors"), base=base)
    broken = dict(state)
    broken["rm_head.5.bias"] = torch.full_like(state["rm_head.5.bias"], float("nan"))
    save_file(broken, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"HPSv3 reward is not finite for images \[0, 1\]"):
        HPSv3(str(tmp_path / "nan.safetensors"), base=base, dtype=torch.float32)(images(2), PROMPTS[:2])


# ---------------------------------------------------------------- UnifiedReward-2.0

@pytest.mark.parametrize("answer, template, expected", [
    ("Alignment Score (1-5): 2.694700002670288\nCoherence Score (1-5): 2.371500015258789\n"
     "Style Score (1-5): 2.802500009536743", "acs", (2.694700002670288 + 2.371500015258789 + 2.802500009536743) / 3),
    ("alignment score: 4\n**Coherence Score (1-5):** 3\nStyle Score (1-5): 5", "acs", 4.0),
    ("Alignment Score (1-5): 4\nCoherence Score (1-5): 3", "acs", None),  # an axis missing
    ("I cannot rate this image.", "acs", None),
    ("cat (object): 1\nred (attribute): 0\nFinal Score: 3.5", "final", 3.5),
    ("Final Score: 2\n... Final Score: 4", "final", 4.0),  # the last one counts
    ("cat (object): 1", "final", None),
])
def test_parse_answer(answer, template, expected):
    assert parse_answer(answer, template) == (pytest.approx(expected) if expected is not None else None)


def test_unifiedreward_defaults_are_the_published_ones():
    from diffusion_dpo_trainer.rewards import unifiedreward as module

    assert module.DEFAULT_MODEL == "CodeGoat24/UnifiedReward-2.0-qwen-7b"
    # point_score_ACS_image_generation.py's prompt: its format block and where the caption goes.
    assert module.ACS_TEMPLATE.format(prompt="a cat").endswith(
        "Output your evaluation using the format below:\n\nAlignment Score (1-5): X\nCoherence Score (1-5): Y\n"
        "Style Score (1-5): Z\n\nYour task is provided as follows:\nText Caption: [a cat]")
    assert module.FINAL_TEMPLATE.format(prompt="a cat").endswith(
        "and assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [a cat]")


def test_parse_answer_unknown_template():
    with pytest.raises(ValueError, match="Unknown UnifiedReward template 'pairwise'"):
        parse_answer("Final Score: 3", "pairwise")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def judge_dir(request, tmp_path_factory):
    return request.param, make_unifiedreward_model(tmp_path_factory.mktemp(request.param), kind=request.param)


def _scripted(reward, answers, seen):
    """Make the judge 'write' `answers` (one per call, for each row), recording its inputs."""
    calls = iter(answers)

    def generate(input_ids, **inputs):
        seen.append({"input_ids": input_ids, **inputs})
        answer = reward.tokenizer(next(calls), add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, answer.expand(len(input_ids), -1)], dim=1)

    reward.model.generate = generate


def test_unifiedreward_loads_the_published_layout_and_names_unparseable_answers(judge_dir):
    kind, path = judge_dir
    reward = load_reward(f"unifiedreward:{path}", max_new_tokens=4, dtype=torch.float32)
    assert isinstance(reward, UnifiedReward)
    assert type(reward.model).__name__ == {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                           "qwen3_vl": "Qwen3VLForConditionalGeneration"}[kind]
    answers = reward.answers(images(), PROMPTS)  # the real greedy generation of the random judge
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    with pytest.raises(UnparseableAnswerError, match=r"images\[0\]: .* has no Alignment/Coherence/Style scores"):
        reward(images(), PROMPTS)
    lenient = UnifiedReward(path, on_unparseable="none", max_new_tokens=4, dtype=torch.float32)
    assert lenient(images(), PROMPTS) == [None, None, None]


def test_unifiedreward_scores_the_judges_answer(judge_dir):
    kind, path = judge_dir
    reward = UnifiedReward(path, batch_size=2, dtype=torch.float32)
    seen = []
    _scripted(reward, ["Alignment Score (1-5): 3.5\nCoherence Score (1-5): 2\nStyle Score (1-5): 4.5",
                       "Alignment Score (1-5): 1\nCoherence Score (1-5): 1\nStyle Score (1-5): 1"], seen)
    assert reward(images(), PROMPTS) == pytest.approx([10 / 3, 10 / 3, 1.0])
    first = seen[0]
    patch = {"qwen2_5_vl": 14, "qwen3_vl": 16}[kind]
    assert first["pixel_values"].shape[1] == 3 * 2 * patch * patch
    # Qwen3-VL's smallest image is 65536 pixels (256 x 256): 16 x 16 patches; Qwen2.5-VL's is 3136 (56 x 56).
    smallest = {"qwen2_5_vl": 4, "qwen3_vl": 16}[kind]  # patches per side of the 64 x 64 test image after resizing
    assert first["image_grid_thw"][0].tolist() == [1, smallest, smallest]
    image_token = reward.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = (first["input_ids"] == image_token).sum(dim=1)
    assert counts.tolist() == (first["image_grid_thw"].prod(dim=1) // 4).tolist()
    shorter = int(counts.argmin())
    assert first["attention_mask"][shorter, 0] == 0 and first["attention_mask"][:, -1].all()  # padded on the left
    text = reward.tokenizer.decode(first["input_ids"][0][first["input_ids"][0] != image_token],
                                   skip_special_tokens=False)
    assert "<|vision_start|><|vision_end|>You are presented with a generated image and its associated text " in text
    assert "Style Score (1-5): Z\n\nYour task is provided as follows:\nText Caption: [a red square]<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_unifiedreward_final_template(judge_dir):
    _, path = judge_dir
    reward = UnifiedReward(path, template="final", dtype=torch.float32)
    seen = []
    _scripted(reward, ["square (object): 1\nred (attribute): 1\nFinal Score: 4"], seen)
    assert reward(images(2), PROMPTS[:2]) == [4.0, 4.0]
    text = reward.tokenizer.decode(seen[0]["input_ids"][0])
    assert "assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: " \
           "[a red square]" in text
    with pytest.raises(ValueError, match="on_unparseable must be"):
        UnifiedReward(path, on_unparseable="skip")
