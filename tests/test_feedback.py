"""AI-feedback pairs: which images win, reproducibility, the canonical format, and the CLIP reward wrappers."""

import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import AutoProcessor, CLIPModel

from diffusion_dpo_trainer.collators import PreferenceCollator
from diffusion_dpo_trainer.feedback import build_preference_pairs, select_pairs
from diffusion_dpo_trainer.formats import prepare_preference_dataset
from diffusion_dpo_trainer.rewards import CLIPScore, PickScore, load_reward
from diffusion_dpo_trainer.sampling import sample_images
from diffusion_dpo_trainer.testing import make_clip_model

SAMPLING = dict(num_inference_steps=2, height=32, width=32)


def brightness(images, prompts):
    """A deterministic reward: mean pixel value."""
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


@pytest.fixture(scope="module")
def pipe(sd_path):
    return DiffusionPipeline.from_pretrained(sd_path)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return make_clip_model(tmp_path_factory.mktemp("clip") / "model")


# ----- pair selection, by hand ----------------------------------------------------------------------------------------
def test_best_vs_worst_takes_the_extremes_and_the_first_of_equals():
    assert select_pairs([0.2, 0.9, 0.1, 0.5]) == [(1, 2)]
    assert select_pairs([0.9, 0.1, 0.9, 0.1]) == [(0, 1)]


def test_equal_scores_never_make_a_pair():
    assert select_pairs([0.3, 0.3, 0.3]) == []
    assert select_pairs([0.3, 0.3, 0.3], strategy="all_pairs") == []
    assert select_pairs([1.0, 1.0, 2.0], strategy="all_pairs") == [(2, 0), (2, 1)]
    assert select_pairs([1.0, 1.0], strategy="random", rng=np.random.default_rng(0)) == []


def test_all_pairs_keeps_only_gaps_above_the_minimum():
    scores = [0.0, 0.5, 1.0, 0.45]
    assert select_pairs(scores, "all_pairs") == [(1, 0), (2, 0), (3, 0), (2, 1), (1, 3), (2, 3)]
    # Gaps: (1,0)=.5 (2,0)=1 (3,0)=.45 (2,1)=.5 (1,3)=.05 (2,3)=.55; strictly more than 0.5 survives.
    assert select_pairs(scores, "all_pairs", min_score_gap=0.5) == [(2, 0), (2, 3)]


def test_random_pairs_are_distinct_labelled_by_score_and_seeded():
    scores = [4.0, 1.0, 3.0, 2.0, 5.0]
    pairs = select_pairs(scores, "random", num_pairs=6, rng=np.random.default_rng(1))
    assert len(pairs) == 6
    assert len({frozenset(p) for p in pairs}) == 6
    assert all(scores[w] > scores[l] for w, l in pairs)
    assert pairs == select_pairs(scores, "random", num_pairs=6, rng=np.random.default_rng(1))
    # Asking for more pairs than exist gives all of them.
    assert len(select_pairs(scores, "random", num_pairs=100, rng=np.random.default_rng(0))) == 10


def test_unknown_strategy_and_negative_gap_are_rejected():
    with pytest.raises(ValueError, match="best_vs_worst"):
        select_pairs([1.0, 2.0], strategy="bestworst")
    with pytest.raises(ValueError, match="min_score_gap"):
        select_pairs([1.0, 1.0], min_score_gap=-1.0)


# ----- pairs built from a real (tiny) pipeline ------------------------------------------------------------------------
def test_pairs_from_a_pipeline_have_exactly_the_expected_winners(pipe):
    prompts, n, seed = ["a red square", "a blue circle"], 3, 7
    dataset = build_preference_pairs(
        pipe, prompts, brightness, num_images_per_prompt=n, strategy="all_pairs", seed=seed, batch_size=4,
        progress=False, **SAMPLING,
    )
    # Independently: regenerate every image from its documented seed and rank by hand.
    flat_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + k for k in range(len(flat_prompts))]
    images = sample_images(pipe, flat_prompts, seeds, batch_size=4, progress=False, **SAMPLING)
    by_seed = {s: np.asarray(im) for s, im in zip(seeds, images)}
    means = {s: float(a.astype(np.float64).mean()) for s, a in by_seed.items()}
    expected = []
    for i, prompt in enumerate(prompts):
        group = seeds[i * n : (i + 1) * n]
        for a in range(n):
            for b in range(a + 1, n):
                if means[group[a]] != means[group[b]]:
                    w, l = (group[a], group[b]) if means[group[a]] > means[group[b]] else (group[b], group[a])
                    expected.append((prompt, w, l))
    assert len(set(means.values())) == len(means), "degenerate test: two images have the same brightness"

    got = list(zip(dataset["prompt"], dataset["chosen_seed"], dataset["rejected_seed"]))
    assert got == expected
    for row in dataset:
        np.testing.assert_array_equal(np.asarray(row["chosen"]), by_seed[row["chosen_seed"]])
        np.testing.assert_array_equal(np.asarray(row["rejected"]), by_seed[row["rejected_seed"]])
        assert row["chosen_score"] == pytest.approx(means[row["chosen_seed"]])
        assert row["rejected_score"] == pytest.approx(means[row["rejected_seed"]])
        assert row["chosen_score"] > row["rejected_score"]


def test_pairs_are_reproducible_and_ready_for_the_trainer(pipe, tmp_path):
    kwargs = dict(num_images_per_prompt=2, seed=3, batch_size=2, progress=False, **SAMPLING)
    first = build_preference_pairs(pipe, ["a red square", "a cat"], brightness, output_path=tmp_path / "pairs", **kwargs)
    second = build_preference_pairs(pipe, ["a red square", "a cat"], brightness, **kwargs)
    assert first["chosen_seed"] == second["chosen_seed"]
    assert [r["chosen"].tobytes() for r in first] == [r["chosen"].tobytes() for r in second]

    from datasets import load_from_disk

    reloaded = load_from_disk(str(tmp_path / "pairs"))
    assert reloaded.column_names == first.column_names
    prepared = prepare_preference_dataset(reloaded)
    batch = PreferenceCollator(32)([prepared[i] for i in range(len(prepared))])
    assert batch["chosen_pixel_values"].shape == (len(prepared), 3, 32, 32)


def test_a_run_without_pairs_fails_and_bad_inputs_are_named(pipe, tmp_path):
    """A constant reward (or one that scores nothing) ranks no images: no pair, an error, and nothing saved."""
    for constant in (lambda ims, ps: [1.0] * len(ims), lambda ims, ps: [None] * len(ims)):
        with pytest.raises(ValueError, match=r"No preference pair.*1 prompt\(s\)"):
            build_preference_pairs(pipe, ["a cat"], constant, num_images_per_prompt=2, progress=False,
                                   output_path=tmp_path / "pairs", **SAMPLING)
    assert not (tmp_path / "pairs").exists()
    with pytest.raises(ValueError, match=r"'nan_reward' returned nan for image 3 \(prompt 'a dog'\)"):
        build_preference_pairs(pipe, ["a cat", "a dog"], nan_reward, num_images_per_prompt=2, batch_size=2,
                               progress=False, **SAMPLING)
    with pytest.raises(ValueError, match="at least 2"):
        build_preference_pairs(pipe, ["a cat"], brightness, num_images_per_prompt=1)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        build_preference_pairs(pipe, ["a cat", None], brightness)
    with pytest.raises(ValueError, match="returned 1 values for 2 images"):
        build_preference_pairs(pipe, ["a cat"], lambda ims, ps: [0.0], num_images_per_prompt=2, progress=False,
                               **SAMPLING)


def nan_reward(images, prompts):
    """A broken reward model: NaN for the second image of a batch of 'a dog'."""
    return [float("nan") if p == "a dog" and i == 1 else float(i) for i, p in enumerate(prompts)]


def test_sampling_restores_modes_and_leaves_the_global_rng_alone(pipe):
    pipe.unet.train()
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    sample_images(pipe, ["a cat"], [0], progress=False, **SAMPLING)
    assert torch.equal(torch.rand(2), expected)
    assert pipe.unet.training and not pipe.vae.training
    pipe.unet.eval()


# ----- CLIP reward wrappers -------------------------------------------------------------------------------------------
def test_clip_rewards_match_the_clip_model_logits(clip_path, pipe):
    images = sample_images(pipe, ["a red square"] * 3, [0, 1, 2], progress=False, **SAMPLING)
    prompts = ["a red square", "a blue circle", "a photo of a dog"]
    model, processor = CLIPModel.from_pretrained(clip_path), AutoProcessor.from_pretrained(clip_path)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, padding=True, return_tensors="pt"))
    logits = out.logits_per_image.diagonal()  # logit_scale.exp() * cosine, per (image i, prompt i)
    scale = model.logit_scale.exp().detach()

    pick = PickScore(clip_path, batch_size=2)
    clip = load_reward(f"clip:{clip_path}", batch_size=1)
    assert isinstance(clip, CLIPScore) and not isinstance(clip, PickScore)
    np.testing.assert_allclose(pick(images, prompts), logits.numpy(), rtol=1e-4)
    np.testing.assert_allclose(clip(images, prompts), (100 * logits / scale).numpy(), rtol=1e-4)


def test_load_reward_resolves_names(clip_path, monkeypatch):
    assert load_reward(brightness) is brightness
    assert isinstance(load_reward(f"pickscore:{clip_path}"), PickScore)
    module = type(sys)("my_rewards")
    module.brightness = brightness
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    assert load_reward("my_rewards:brightness") is brightness
    with pytest.raises(ValueError, match="Unknown reward 'not-a-reward'"):
        load_reward("not-a-reward")
    with pytest.raises(ValueError, match="Could not import reward"):
        load_reward("my_rewards:missing")



def test_build_pairs_command_without_pairs_exits_2_and_saves_nothing(sd_path, tmp_path, monkeypatch, capsys):
    from diffusion_dpo_trainer import cli

    module = type(sys)("constant_reward")
    module.constant = lambda images, prompts: [1.0] * len(images)
    monkeypatch.setitem(sys.modules, "constant_reward", module)
    out = tmp_path / "pairs"
    assert cli.main(["build-pairs", "--model", sd_path, "--reward", "constant_reward:constant", "--prompt", "a cat",
                     "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--resolution", "32",
                     "--output_dir", str(out)]) == 2
    assert "error: No preference pair" in capsys.readouterr().err
    assert not out.exists()
