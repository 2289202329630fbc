"""Reward models on tiny random checkpoints in their real layouts: loading, scoring against independently computed
references, preprocessing, batching, weighted sums, the HTTP reward and its server, and input errors."""

import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, CLIPModel

from diffusion_dpo_trainer import cli
from diffusion_dpo_trainer.rewards import WeightedReward, load_reward
from diffusion_dpo_trainer.rewards.aesthetic import AestheticScore
from diffusion_dpo_trainer.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ModelReward,
    load_torch_checkpoint,
    normalize,
    resize_center_crop,
    resize_longest_pad,
    to_tensor,
)
from diffusion_dpo_trainer.rewards.hps import HPSv2
from diffusion_dpo_trainer.rewards.http import HTTPReward, RewardServerError, make_reward_server
from diffusion_dpo_trainer.rewards.imagereward import REWARD_MEAN, REWARD_STD, ImageReward
from diffusion_dpo_trainer.testing import make_aesthetic_model, make_clip_model, make_hps_model, make_imagereward_model

PROMPTS = ["a red square", "a photo of a cat", "the blue circle on a dog", "a painting"]


def images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (48, 40), (40, 64), (33, 31)]  # (width, height): square, landscape, portrait, odd
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    checkpoint, clip = make_hps_model(tmp_path_factory.mktemp("hps"))
    return checkpoint, clip


@pytest.fixture(scope="module")
def imagereward(tmp_path_factory):
    checkpoint, tokenizer, vision, text = make_imagereward_model(tmp_path_factory.mktemp("ir"))
    return {"checkpoint": checkpoint, "tokenizer": tokenizer, "vision_config": vision, "text_config": text}


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return make_clip_model(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory):
    return make_aesthetic_model(tmp_path_factory.mktemp("aesthetic"))


# ---------------------------------------------------------------- preprocessing, as each reference does it

def test_normalisation_constants_are_openai_clips():
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)  # ImageReward.py
    mean_pixel = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1).expand(3, 2, 2)
    assert torch.allclose(normalize(mean_pixel), torch.zeros(3, 2, 2), atol=1e-7)
    assert torch.allclose(normalize(mean_pixel + torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)), torch.ones(3, 2, 2))


def test_resize_center_crop_is_torchvisions_resize_then_center_crop():
    array = np.random.default_rng(0).integers(0, 256, (32, 35, 3), dtype=np.uint8)
    # Short side already 32: no resize; torchvision's crop offset is round((35 - 32) / 2) = round(1.5) = 2.
    np.testing.assert_array_equal(np.asarray(resize_center_crop(Image.fromarray(array), 32)), array[:, 2:34])
    tall = array.transpose(1, 0, 2).copy()
    np.testing.assert_array_equal(np.asarray(resize_center_crop(Image.fromarray(tall), 32)), tall[2:34])
    # Short side 40 -> 32 (PIL bicubic), long side int(32 * 48 / 40) = 38, then the middle 32 columns.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((38, 32), Image.BICUBIC))[:, 3:35]
    np.testing.assert_array_equal(np.asarray(resize_center_crop(image, 32)), expected)
    assert resize_center_crop(image.convert("L"), 32).mode == "RGB"


def test_resize_longest_pad_is_hpsv2s_resize_max_size():
    image = Image.new("RGB", (64, 32), (255, 0, 0))  # 2:1 -> 32 x 16, padded with 8 zero rows above and below
    pixels = resize_longest_pad(to_tensor(image), 32)
    assert pixels.shape == (3, 32, 32)
    assert torch.count_nonzero(pixels[:, :8]) == 0 and torch.count_nonzero(pixels[:, 24:]) == 0
    assert torch.allclose(pixels[0, 8:24], torch.ones(16, 32), atol=1e-6)  # interpolation keeps a flat colour
    assert torch.count_nonzero(pixels[1:, 8:24]) == 0
    # Golden values from HPSv2's own transform (torchvision 0.28: ToTensor, antialiased bicubic Resize, pad,
    # Normalize), printed by scripts/check_rewards_against_references.py's `hps_transform`.
    y, x = np.mgrid[0:40, 0:48]
    pattern = np.stack([(x * 37 + y * 11) % 256, (x * x + 3 * y) % 256, (x * y) % 256], -1).astype(np.uint8)
    ours = normalize(resize_longest_pad(to_tensor(Image.fromarray(pattern)), 32))
    reference = [-1.31348, -0.62167, 0.23192, 1.20148, -1.32695, -0.44757, 0.35995, 1.35259, -0.55777, -0.12977,
                 0.32967, 0.76517]
    np.testing.assert_allclose(ours[:, 16, 10:14].flatten(), reference, atol=1e-4)
    square = to_tensor(images(1)[0])
    assert torch.equal(resize_longest_pad(square, 32), square)  # already the size: untouched


# ---------------------------------------------------------------- HPSv2: converted open_clip model

def open_clip_score(state, pixels, token_ids, heads):
    """The open_clip CLIP forward (ViT image tower, causal text tower) written from the state dict alone."""
    state = {k: v.float() for k, v in state.items()}

    def blocks(x, prefix, mask=None):
        layers = len({k.split("resblocks.")[1].split(".")[0] for k in state if k.startswith(prefix + "transformer.")})
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            ln = lambda y, n: F.layer_norm(y, y.shape[-1:], state[p + n + ".weight"], state[p + n + ".bias"])  # noqa
            attn = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
            attn.load_state_dict({k.removeprefix(p + "attn."): v for k, v in state.items()
                                  if k.startswith(p + "attn.")})
            h = ln(x, "ln_1")
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.gelu(F.linear(ln(x, "ln_2"), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        return x

    ln = lambda y, n: F.layer_norm(y, y.shape[-1:], state[n + ".weight"], state[n + ".bias"])
    conv = state["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = blocks(ln(x + state["visual.positional_embedding"], "visual.ln_pre"), "visual.")
    image = ln(x[:, 0], "visual.ln_post") @ state["visual.proj"]
    length = token_ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    t = blocks(state["token_embedding.weight"][token_ids] + state["positional_embedding"], "", causal)
    text = ln(t, "ln_final")[torch.arange(len(token_ids)), token_ids.argmax(-1)] @ state["text_projection"]
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


def test_hps_score_equals_the_open_clip_forward_of_its_checkpoint(hps):
    checkpoint, clip = hps
    reward = load_reward(f"hpsv2.1:{checkpoint}", clip=clip)
    assert isinstance(reward, HPSv2) and reward.dtype == torch.float32  # half-precision file, float32 model
    batch = images()
    tokenizer = AutoTokenizer.from_pretrained(clip)
    # open_clip's tokenizer: start + BPE + end, zero-padded to 77 (no attention mask: the text tower is causal).
    ids = torch.zeros(len(PROMPTS), 77, dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        tokens = tokenizer(prompt.lower()).input_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
    pixels = torch.stack([normalize(resize_longest_pad(to_tensor(im), 32)) for im in batch])
    expected = open_clip_score(load_torch_checkpoint(checkpoint), pixels, ids, heads=2)
    np.testing.assert_allclose(reward(batch, PROMPTS), expected.detach().numpy(), atol=2e-5)
    assert reward(batch, PROMPTS) != pytest.approx(reward(batch[::-1], PROMPTS), abs=1e-4)  # images matter
    # Prompts are cleaned as open_clip does: HTML entities, spaces and case do not change the score.
    cleaned = reward(batch[:1], ["a red & square"])
    assert reward(batch[:1], ["A  RED &amp;amp; square"]) == pytest.approx(cleaned, abs=1e-6)


def test_hps_rejects_a_checkpoint_of_another_architecture(hps, tmp_path):
    checkpoint, clip = hps
    state = load_torch_checkpoint(checkpoint)
    torch.save({"state_dict": {**state, "visual.extra.weight": torch.zeros(2)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="1 keys that an open_clip ViT CLIP does not have"):
        HPSv2(str(tmp_path / "bad.pt"), clip=clip)
    with pytest.raises(ValueError, match="Unknown HPS version"):
        HPSv2(checkpoint, version="3", clip=clip)


# ---------------------------------------------------------------- ImageReward: BLIP on transformers

def test_imagereward_normalises_its_mlp_output_with_the_reference_constants(imagereward, tmp_path):
    state = torch.load(imagereward["checkpoint"], weights_only=True)
    state["mlp.layers.7.weight"] = torch.zeros_like(state["mlp.layers.7.weight"])
    state["mlp.layers.7.bias"] = torch.tensor([2.5])
    torch.save(state, tmp_path / "ImageReward.pt")
    reward = ImageReward(**{**imagereward, "checkpoint": str(tmp_path / "ImageReward.pt")})
    expected = (2.5 - 0.16717362830052426) / 1.0333394966054072
    assert reward(images(), PROMPTS) == pytest.approx([expected] * 4, abs=1e-6)


def test_imagereward_reads_both_the_image_and_the_prompt(imagereward):
    reward = load_reward(f"imagereward:{imagereward['checkpoint']}",
                         **{k: v for k, v in imagereward.items() if k != "checkpoint"})
    batch = images()
    by_image = reward(batch, [PROMPTS[0]] * 4)
    by_prompt = reward([batch[0]] * 4, PROMPTS)
    assert len(set(np.round(by_image, 5))) == 4 and len(set(np.round(by_prompt, 5))) == 4
    # Prompts are padded to 35 tokens with a mask, so a prompt's padding never changes its score.
    assert reward(batch[:1], PROMPTS[:1]) == pytest.approx(reward(batch[:2], PROMPTS[:1] * 2)[:1], abs=1e-6)


def test_imagereward_checkpoint_must_match_the_architecture(imagereward, tmp_path):
    state = torch.load(imagereward["checkpoint"], weights_only=True)
    del state["blip.visual_encoder.norm.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="(?s)not an ImageReward v1.0 checkpoint.*post_layernorm.weight"):
        ImageReward(**{**imagereward, "checkpoint": str(tmp_path / "ImageReward.pt")})


# ---------------------------------------------------------------- LAION aesthetic predictor

def test_aesthetic_score_is_the_mlp_of_the_normalised_clip_image_embedding(aesthetic):
    head, clip = aesthetic
    reward = load_reward(f"aesthetic:{head}", clip=clip)
    assert isinstance(reward, AestheticScore)
    batch = images()
    model, processor = CLIPModel.from_pretrained(clip), AutoProcessor.from_pretrained(clip)
    with torch.no_grad():
        embeds = model.get_image_features(**processor(images=batch, return_tensors="pt"))
        embeds = getattr(embeds, "pooler_output", embeds).numpy()
    x = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)  # simple_inference.py's `normalized`
    weights = {k: v.double().numpy() for k, v in torch.load(head, weights_only=True).items()}
    for layer in (0, 2, 4, 6, 7):  # Linear layers; the Dropouts are identities at inference
        x = x @ weights[f"layers.{layer}.weight"].T + weights[f"layers.{layer}.bias"]
    np.testing.assert_allclose(reward(batch, PROMPTS), x[:, 0], atol=1e-5)
    assert reward(batch, ["anything"] * 4) == reward(batch, PROMPTS)  # prompt-free


# ---------------------------------------------------------------- shared behaviour

@pytest.fixture(scope="module")
def all_rewards(hps, imagereward, aesthetic, clip_path):
    return {
        "hpsv2.1": load_reward(f"hpsv2.1:{hps[0]}", clip=hps[1], batch_size=3),
        "imagereward": ImageReward(**imagereward, batch_size=3),
        "aesthetic": load_reward(f"aesthetic:{aesthetic[0]}", clip=aesthetic[1], batch_size=3),
        "pickscore": load_reward(f"pickscore:{clip_path}", batch_size=3),
    }


def test_scores_do_not_depend_on_the_batch_size(all_rewards):
    batch = images()
    for name, reward in all_rewards.items():
        batched = reward(batch, PROMPTS)
        reward.batch_size = 1
        try:
            one_by_one = reward(batch, PROMPTS)
        finally:
            reward.batch_size = 3
        np.testing.assert_allclose(batched, one_by_one, atol=1e-5, err_msg=name)


def test_bad_input_gets_a_clear_error(all_rewards):
    for reward in all_rewards.values():
        with pytest.raises(ValueError, match="Got 4 images but 3 prompts"):
            reward(images(), PROMPTS[:3])
        with pytest.raises(TypeError, match=r"images\[1\]: expected a PIL.Image.Image, got str"):
            reward([images(1)[0], "cat.png"], PROMPTS[:2])
        with pytest.raises(TypeError, match="not a single item"):
            reward(images(1), PROMPTS[0])
    with pytest.raises(ValueError, match="Unknown reward 'hps3'.*hpsv2.1"):
        load_reward("hps3")


def test_a_reward_model_without_score_batch_cannot_be_built():
    class Unfinished(ModelReward):
        def __init__(self):
            self.model = torch.nn.Linear(1, 1)

    with pytest.raises(TypeError, match="score_batch"):
        Unfinished()


def test_a_missing_optional_package_names_the_extra(hps, monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "diffusion-dpo-trainer\[rewards\]"'):
        load_reward(f"hpsv2.1:{hps[0]}", clip=hps[1])


def brightness(images, prompts):
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


def prompt_length(images, prompts):
    return [float(len(p)) for p in prompts]


@pytest.fixture
def my_rewards(monkeypatch):
    module = type(sys)("my_rewards")
    module.brightness, module.prompt_length = brightness, prompt_length
    monkeypatch.setitem(sys.modules, "my_rewards", module)


def test_weighted_sum_of_rewards(my_rewards, hps):
    batch = images()
    expected = [b + 0.5 * n for b, n in zip(brightness(batch, PROMPTS), prompt_length(batch, PROMPTS))]
    for spec in ("my_rewards:brightness:1.0,my_rewards:prompt_length:0.5",
                 {"my_rewards:brightness": 1.0, "my_rewards:prompt_length": 0.5},
                 [brightness, (prompt_length, 0.5)]):
        reward = load_reward(spec)
        assert isinstance(reward, WeightedReward)
        assert reward(batch, PROMPTS) == pytest.approx(expected)
    assert load_reward("my_rewards:prompt_length:2")(batch, PROMPTS) == pytest.approx([24.0, 32.0, 48.0, 20.0])
    # A model reward with a checkpoint path and a weight.
    checkpoint, clip = hps
    hps_reward = load_reward(f"hpsv2.1:{checkpoint}", clip=clip)
    mixed = load_reward(f"hpsv2.1:{checkpoint}:10,my_rewards:prompt_length:1", clip=clip)
    assert mixed.names == [f"hpsv2.1:{checkpoint}", "my_rewards:prompt_length"]
    np.testing.assert_allclose(mixed(batch, PROMPTS), 10 * np.array(hps_reward(batch, PROMPTS))
                               + np.array(prompt_length(batch, PROMPTS)), rtol=1e-6)
    with pytest.raises(ValueError, match="Empty component"):
        load_reward("my_rewards:brightness:1.0,")


# ---------------------------------------------------------------- the HTTP reward and its server

@pytest.fixture
def server():
    started = []

    def start(reward_fn, **kwargs):
        srv = make_reward_server(reward_fn, "127.0.0.1", 0, **kwargs)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        started.append((srv, thread))
        return f"http://127.0.0.1:{srv.server_address[1]}/score"

    yield start
    for srv, thread in started:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def test_http_reward_scores_like_the_local_one(server, all_rewards):
    url = server(all_rewards["hpsv2.1"])
    reward = load_reward(url, batch_size=3)
    assert isinstance(reward, HTTPReward)
    batch = images()
    assert reward(batch, PROMPTS) == pytest.approx(all_rewards["hpsv2.1"](batch, PROMPTS), abs=1e-7)


def test_http_reward_errors(server, monkeypatch):
    def boom(images, prompts):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RewardServerError, match=r"rejected the request \(500\): RuntimeError: CUDA out of memory"):
        HTTPReward(server(boom))(images(1), PROMPTS[:1])
    with pytest.raises(RewardServerError, match=r"answered \{'scores': \[1.0\]\}; expected.*for 2 images"):
        HTTPReward(server(lambda images, prompts: [1.0]))(images(2), PROMPTS[:2])
    small = server(brightness, max_batch_size=2)
    with pytest.raises(RewardServerError, match=r"\(400\).*at most 2"):
        HTTPReward(small, batch_size=3)(images(3), PROMPTS[:3])
    tiny = server(brightness, max_request_bytes=100)
    with pytest.raises(RewardServerError, match=r"\(413\).*at most 100"):
        HTTPReward(tiny)(images(1), PROMPTS[:1])
    # A request that is not an image: the server names the position.
    monkeypatch.setattr("diffusion_dpo_trainer.rewards.http.encode_image", lambda image: "bm90IGFuIGltYWdl")
    with pytest.raises(RewardServerError, match=r"\(400\).*images\[0\]: not a base64-encoded image"):
        HTTPReward(small)(images(1), PROMPTS[:1])


def test_http_reward_times_out_and_reports_a_server_that_is_down(server):
    def slow(images, prompts):
        time.sleep(2)
        return brightness(images, prompts)

    with pytest.raises(ConnectionError, match="did not answer within 0.5 s"):
        HTTPReward(server(slow), timeout=0.5)(images(1), PROMPTS[:1])
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match="Is it running.*diffusion-dpo serve-reward"):
        HTTPReward(f"http://127.0.0.1:{port}/score", timeout=5)(images(1), PROMPTS[:1])


def test_serve_reward_command(my_rewards, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    codes = []
    thread = threading.Thread(target=lambda: codes.append(cli.main(
        ["serve-reward", "--reward", "my_rewards:brightness", "--port", str(port), "--max_requests", "2"])))
    thread.start()
    reward = HTTPReward(f"http://127.0.0.1:{port}/", timeout=10, batch_size=2)
    for _ in range(100):  # until it listens
        try:
            scores = reward(images(3), PROMPTS[:3])  # two requests: 2 images, then 1
            break
        except ConnectionError:
            time.sleep(0.05)
    thread.join(timeout=30)
    assert not thread.is_alive() and codes == [0]
    assert scores == pytest.approx(brightness(images(3), PROMPTS[:3]))
    assert f"serving my_rewards:brightness on http://127.0.0.1:{port}/" in capsys.readouterr().out


def test_a_served_reward_labels_pairs_and_judges_win_rates(server, all_rewards, sd_path):
    """The same reward, by URL, drives AI-feedback pairs and win rates (no extra arguments needed)."""
    from diffusion_dpo_trainer.evaluation import evaluate_win_rate
    from diffusion_dpo_trainer.feedback import build_preference_pairs

    hps = all_rewards["hpsv2.1"]
    url = server(hps)
    sampling = {"num_inference_steps": 2, "height": 32, "width": 32, "progress": False}
    pairs = build_preference_pairs(sd_path, PROMPTS[:2], url, num_images_per_prompt=3, **sampling)
    assert len(pairs) == 2
    for row in pairs:
        chosen, rejected = hps([row["chosen"], row["rejected"]], [row["prompt"]] * 2)
        assert (row["chosen_score"], row["rejected_score"]) == pytest.approx((chosen, rejected), abs=1e-6)
        assert chosen > rejected
    result = evaluate_win_rate(sd_path, sd_path, PROMPTS[:2], url, seeds=[0], **sampling)
    assert result["win_rate"] == 0.5 and result["ties"] == 2
