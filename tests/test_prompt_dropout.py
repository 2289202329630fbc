"""Prompt dropout (`proportion_empty_prompts`): per pair, deterministic per (seed, row), cached like any prompt."""

import os

import numpy as np
import pytest
import torch
from helpers import lora, losses_of, make_args

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from diffusion_dpo_trainer.collators import PreferenceCollator, UnpairedCollator
from diffusion_dpo_trainer.formats import prepare_preference_dataset


def text_rows(n, start=0):
    """Rows as the collator sees them, with already-decoded latents so no image work is needed."""
    latent = torch.zeros(4, 4, 4)
    return [{"prompt": f"prompt {i}", "row_index": i, "chosen_latent_mean": latent, "chosen_latent_std": latent,
             "rejected_latent_mean": latent, "rejected_latent_std": latent, "chosen_original_size": [32, 32],
             "rejected_original_size": [32, 32], "chosen_crop_top_left": [0, 0], "rejected_crop_top_left": [0, 0]}
            for i in range(start, start + n)]


def dropped_rows(collator, rows, batch_size):
    dropped = set()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = collator(batch)["prompt"]
        dropped |= {row["row_index"] for row, prompt in zip(batch, prompts) if prompt == ""}
        kept = [(row, prompt) for row, prompt in zip(batch, prompts) if prompt != ""]
        assert all(prompt == row["prompt"] for row, prompt in kept)  # a kept prompt is the row's own
    return dropped


def test_drop_rate_is_close_to_the_proportion():
    rows = text_rows(20000)
    for proportion in (0.2, 0.5):
        rate = len(dropped_rows(PreferenceCollator(32, proportion_empty_prompts=proportion, seed=3), rows, 500)) / 20000
        # binomial standard deviation <= 0.0036 at n = 20000: 4 sigma
        assert abs(rate - proportion) < 0.015, (proportion, rate)
    assert not dropped_rows(PreferenceCollator(32, proportion_empty_prompts=0.0), rows[:2000], 100)
    assert len(dropped_rows(PreferenceCollator(32, proportion_empty_prompts=1.0), rows[:2000], 100)) == 2000


def test_draw_depends_on_seed_and_row_only():
    rows = text_rows(400)
    collator = PreferenceCollator(32, proportion_empty_prompts=0.3, seed=7)
    reference = dropped_rows(collator, rows, 8)
    # Other batch sizes, another order, a disturbed global RNG, a fresh collator: the same rows are dropped.
    torch.manual_seed(123)
    np.random.seed(123)
    assert dropped_rows(collator, rows, 3) == reference
    assert dropped_rows(PreferenceCollator(32, proportion_empty_prompts=0.3, seed=7), rows[::-1], 5) == reference
    # Another seed drops other rows (independently: overlap near 0.3 * 0.3 of the rows).
    other = dropped_rows(PreferenceCollator(32, proportion_empty_prompts=0.3, seed=8), rows, 8)
    assert other != reference
    assert len(other & reference) < 0.6 * len(reference)


def test_unpaired_rows_are_dropped_one_by_one():
    latent = torch.zeros(4, 4, 4)
    rows = [{"prompt": f"p {i}", "row_index": i, "label": i % 2 == 0, "image_latent_mean": latent,
             "image_latent_std": latent, "image_original_size": [32, 32], "image_crop_top_left": [0, 0]}
            for i in range(2000)]
    collator = UnpairedCollator(32, proportion_empty_prompts=0.25, seed=1)
    prompts = [p for start in range(0, 2000, 50) for p in collator(rows[start:start + 50])["prompt"]]
    assert abs(prompts.count("") / 2000 - 0.25) < 0.04


def test_proportion_is_validated(tmp_path):
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="proportion_empty_prompts"):
            DiffusionDPOConfig(output_dir=str(tmp_path), proportion_empty_prompts=bad)


def _record_prompts_and_conditioning(trainer):
    """Wrap the family so every encoded prompt batch and every denoiser conditioning is recorded."""
    family, seen = trainer.family, {"prompts": [], "conditioning": []}
    encode, predict = family.encode_prompt, family.predict

    def recording_encode(prompts, device):
        seen["prompts"].append(list(prompts))
        return encode(prompts, device)

    def recording_predict(denoiser, noisy, timesteps, conditioning):
        seen["conditioning"].append({k: v.detach().clone() for k, v in conditioning.items()})
        return predict(denoiser, noisy, timesteps, conditioning)

    family.encode_prompt, family.predict = recording_encode, recording_predict
    return seen


def test_both_images_of_a_pair_share_the_prompt_and_runs_repeat(tmp_path, sd_path, pairs):
    """In training, a dropped pair conditions winner AND loser on the empty prompt; two runs drop the same pairs."""
    runs = []
    for run in range(2):
        args = make_args(tmp_path / str(run), proportion_empty_prompts=0.5, max_steps=8, per_device_train_batch_size=4)
        trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora())
        seen = _record_prompts_and_conditioning(trainer)
        trainer.train()
        runs.append(seen["prompts"])
        for conditioning in seen["conditioning"]:
            for value in conditioning.values():
                winners, losers = value.chunk(2)
                torch.testing.assert_close(winners, losers, rtol=0, atol=0)
    prompts = [p for batch in runs[0] for p in batch]
    assert runs[0] == runs[1]
    assert 0 < prompts.count("") < len(prompts)
    # Each row drops in every epoch or in none: 8 steps of 4 over 8 pairs is 4 epochs.
    dropped_per_epoch = [sum(p == "" for batch in runs[0][2 * e:2 * e + 2] for p in batch) for e in range(4)]
    assert len(set(dropped_per_epoch)) == 1


def test_resume_with_prompt_dropout_matches_an_uninterrupted_run(tmp_path, sd_path, pairs):
    def run(name, **overrides):
        args = make_args(tmp_path / name, max_steps=4, proportion_empty_prompts=0.5, **overrides)
        return DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora())

    straight = run("straight")
    straight.train()
    first = run("first", save_steps=2, save_strategy="steps")
    first.train()
    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=os.path.join(first.args.output_dir, "checkpoint-2"))
    expected = {k: v for k, v in straight.family.pipeline.unet.state_dict().items() if "lora" in k}
    actual = resumed.family.pipeline.unet.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6)
    assert losses_of(resumed)[-2:] == pytest.approx(losses_of(straight)[-2:], abs=1e-6)


def test_cached_embeddings_give_the_same_losses_with_dropout(tmp_path, sd_path, pairs):
    """The empty prompt's embedding is cached too, and cached training drops the same pairs as uncached training."""
    runs = {}
    for name, cached, proportion in (("plain", False, 0.5), ("cached", True, 0.5), ("none", False, 0.0)):
        args = make_args(tmp_path / name, max_steps=3, proportion_empty_prompts=proportion,
                         precompute_text_embeddings=cached)
        trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs)  # full fine-tune: losses move
        if cached:
            assert "" in trainer.data_collator.prompt_embeddings.rows
        trainer.train()
        runs[name] = losses_of(trainer)
    assert runs["cached"] == pytest.approx(runs["plain"], abs=1e-5)
    assert runs["none"][1:] != pytest.approx(runs["plain"][1:], abs=1e-5)  # dropout changed what was trained


def test_model_card_records_the_proportion(tmp_path, sd_path, pairs):
    args = make_args(tmp_path, proportion_empty_prompts=0.2, max_steps=1)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=prepare_preference_dataset(pairs),
                                  peft_config=lora())
    trainer.train()
    trainer.save_model()
    assert "proportion_empty_prompts" in (tmp_path / "out" / "README.md").read_text()



def test_a_custom_collator_is_warned_that_it_decides_the_prompts(tmp_path, sd_path, pairs):
    with pytest.warns(UserWarning, match="proportion_empty_prompts is applied by the default collator"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, proportion_empty_prompts=0.2),
                            train_dataset=pairs, peft_config=lora(), data_collator=lambda rows: rows)
