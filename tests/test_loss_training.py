"""Every loss_type trains end to end on the tiny SD pipeline; losses without a reference never run one; KTO trains on
unpaired data."""

import math
import os

import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers import LN2, assert_cached_run_matches_uncached, changed, lora, losses_of, make_args, snapshot

from diffusion_dpo_trainer import DiffusionDPOTrainer


def count_denoiser_calls(trainer):
    """Forward pre-hooks on every denoiser the trainer could run: the policy and any reference copy."""
    calls = []
    modules = [trainer.family.denoiser] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    for module in modules:
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def mapo_by_hand(m_w, m_l, beta=0.1, gamma=0.5, temperature=1000.0):
    def s(m):
        return gamma * m / (math.exp(gamma * m) - 1)

    return m_w - beta * logsigmoid(temperature * (s(m_w) - s(m_l)))


# With LoRA the policy equals the reference at step 1, so each first loss is known in closed form.
CASES = {
    "sigmoid+label_smoothing": (dict(loss_type="sigmoid", label_smoothing=0.1), True, lambda log: LN2),
    "hinge": (dict(loss_type="hinge"), True, lambda log: 1.0),
    "ipo": (dict(loss_type="ipo", beta=10.0), True, lambda log: (1 / (2 * 10.0)) ** 2),
    "sft": (dict(loss_type="sft"), False, lambda log: log["mse/chosen"]),
    # one pair per batch, so the logged batch means are the per-pair errors the loss saw
    "mapo": (dict(loss_type="mapo", per_device_train_batch_size=1), False,
             lambda log: mapo_by_hand(log["mse/chosen"], log["mse/rejected"])),
    "sigmoid+sft": (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]), True,
                    lambda log: LN2 + 0.2 * log["mse/chosen"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_loss_trains_with_lora(tmp_path, sd_path, pairs, case):
    overrides, needs_reference, first_loss = CASES[case]
    args = make_args(tmp_path, max_steps=2, **overrides, learning_rate=1e-4)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora())
    calls = count_denoiser_calls(trainer)
    lora_before = {k: v for k, v in snapshot(trainer.family.denoiser).items() if "lora" in k}

    trainer.train()

    assert len(calls) == args.max_steps * (2 if needs_reference else 1)
    first = trainer.state.log_history[0]
    assert losses_of(trainer)[0] == pytest.approx(first_loss(first), rel=1e-4, abs=1e-6)
    assert all(math.isfinite(x) for x in losses_of(trainer))
    assert changed(lora_before, trainer.family.denoiser), "LoRA weights did not train"
    assert "mse/margin" in first
    assert ("rewards/margins" in first) == needs_reference


def test_reference_free_full_finetune_makes_no_frozen_copy(tmp_path, sd_path, pairs):
    args = make_args(tmp_path, max_steps=2, loss_type="mapo", learning_rate=1e-3)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs)
    assert trainer.ref_model is None
    calls = count_denoiser_calls(trainer)
    before = snapshot(trainer.family.denoiser)
    trainer.train()
    assert len(calls) == args.max_steps
    assert changed(before, trainer.family.denoiser)
    trainer.save_model()
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    assert "`mapo`" in card and "- `mapo_gamma`: 0.5\n" in card and "- `mapo_temperature`: 1000\n" in card
    assert "beta =" not in card and "`beta`" not in card and "lora_rank" not in card  # MaPO reads no beta


def test_an_explicit_reference_is_ignored_with_a_warning_when_not_needed(tmp_path, sd_path, pairs):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    with pytest.warns(UserWarning, match="`ref_model` is ignored"):
        trainer = DiffusionDPOTrainer(model=sd_path, ref_model=other, args=make_args(tmp_path, loss_type="sft", max_steps=3, learning_rate=1e-4),
                                      train_dataset=pairs, peft_config=lora())
    assert trainer.ref_model is None


# ----- KTO on unpaired data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(pairs):
    """Every chosen image as desirable, every rejected one as undesirable: 16 unpaired rows."""
    n = len(pairs)
    features = Features({"prompt": Value("string"), "image": ImageFeature(), "label": Value("bool")})
    return Dataset.from_dict(
        {"prompt": list(pairs["prompt"]) * 2, "image": list(pairs["chosen"]) + list(pairs["rejected"]),
         "label": [True] * n + [False] * n},
        features=features,
    )


def test_kto_trains_on_unpaired_data(tmp_path, sd_path, labelled):
    # The whole dataset in one batch, so the first batch's label mix (8 desirable, 8 not) is known.
    args = make_args(tmp_path, loss_type="kto", max_steps=2, per_device_train_batch_size=len(labelled),
                     kto_desirable_weight=2.0, kto_undesirable_weight=1.0, learning_rate=1e-4)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=labelled, eval_dataset=labelled,
                                  peft_config=lora())
    calls = count_denoiser_calls(trainer)
    draws = []
    original = trainer.family.noisy_latents_and_target

    def spy(x0, noise, timesteps):
        draws.append((noise.clone(), timesteps.clone()))
        return original(x0, noise, timesteps)

    trainer.family.noisy_latents_and_target = spy
    lora_before = {k: v for k, v in snapshot(trainer.family.denoiser).items() if "lora" in k}

    trainer.train()

    assert len(calls) == 2 * args.max_steps  # one policy and one reference forward per step
    noise, timesteps = draws[0]
    assert noise.shape[0] == timesteps.shape[0] == len(labelled)
    assert not torch.equal(noise[:8], noise[8:])  # unpaired images do not share noise
    first = trainer.state.log_history[0]
    # policy == reference: g = 0, z0 = 0, each image's loss is lambda_y * (1 - sigmoid(0)).
    assert losses_of(trainer)[0] == pytest.approx(0.5 * (2.0 * 8 + 1.0 * 8) / 16, abs=1e-6)
    assert first["kto/reference_point"] == 0.0
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rewards/rejected", "mse/chosen", "mse/rejected", "ref_mse/chosen", "ref_mse/rejected"):
        assert key in first
    assert changed(lora_before, trainer.family.denoiser), "LoRA weights did not train"
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_kto/reference_point" in metrics


def test_kto_trains_from_cached_latents_and_embeddings_with_the_same_losses(tmp_path, sdxl_path, labelled):
    """Unpaired rows cache like pairs: no VAE or text encoder runs in a step, and a full fine-tune with flips gives
    the same loss at every step as encoding the images and prompts each step (same seed, same draws)."""

    def make_trainer(cached):
        # beta 100: logits stay far from saturation, so every step's loss depends on the noise drawn.
        args = make_args(tmp_path / str(cached), loss_type="kto", beta=100, max_steps=3,
                         per_device_train_batch_size=4, learning_rate=1e-3, random_flip=True, precompute_latents=cached,
                         precompute_text_embeddings=cached)
        return DiffusionDPOTrainer(model=sdxl_path, args=args, train_dataset=labelled, eval_dataset=labelled)

    assert_cached_run_matches_uncached(make_trainer, "image")


def test_kto_reference_point_is_a_mean_over_all_processes(tmp_path, sd_path, labelled, monkeypatch):
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="kto", max_steps=3, learning_rate=1e-4), train_dataset=labelled,
                                  peft_config=lora())
    # Pretend a second process holds three values summing to 3.0.
    other = torch.tensor([[3.0, 3.0]])
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([t, other.to(t)]))
    assert trainer._global_mean(torch.tensor([0.5, 1.5])).item() == pytest.approx((0.5 + 1.5 + 3.0) / 5)


def test_metrics_skip_steps_where_a_group_was_absent(tmp_path, sd_path, labelled):
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="kto", max_steps=3, learning_rate=1e-4), train_dataset=labelled,
                                  peft_config=lora())
    store = trainer._metrics["train"]
    store["rewards/chosen"] += [torch.tensor(float("nan")), torch.tensor(2.0), torch.tensor(4.0)]
    store["rewards/rejected"] += [torch.tensor(float("nan"))]
    assert trainer._pop_metrics("train") == {"rewards/chosen": 3.0}


def test_kto_on_sdxl_conditions_each_image_on_its_own_size(tmp_path, sdxl_path, labelled):
    from PIL import Image

    data = Dataset.from_dict({"prompt": ["a", "b"], "image": [Image.new("RGB", (64, 32)), Image.new("RGB", (40, 80))],
                              "label": [True, False]})
    args = make_args(tmp_path, loss_type="kto", max_steps=1, learning_rate=1e-4)
    trainer = DiffusionDPOTrainer(model=sdxl_path, args=args, train_dataset=data, peft_config=lora())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    time_ids = trainer.family.time_conditioning(batch, 32, torch.device("cpu"))["time_ids"]
    assert time_ids.tolist() == [[32, 64, 0, 16, 32, 32], [80, 40, 16, 0, 32, 32]]
    trainer.train()
    assert math.isfinite(losses_of(trainer)[0])


# ----- bad input --------------------------------------------------------------------------------------------------
def test_unknown_loss_type_lists_valid_names(tmp_path, sd_path, pairs):
    with pytest.raises(ValueError, match=r"Unknown loss_type \['orpo'\]; valid names are: sigmoid, hinge, ipo, sft, "
                                         r"mapo, kto"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="orpo", max_steps=3, learning_rate=1e-4), train_dataset=pairs)
    with pytest.raises(ValueError, match=r"Unknown loss_type \['dpo'\].*sigmoid"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="dpo", max_steps=3, learning_rate=1e-4), train_dataset=pairs)


def test_mixing_paired_and_unpaired_losses_errors(tmp_path, sd_path, pairs):
    with pytest.raises(ValueError, match=r"mixes losses for paired data .* and unpaired data"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type=["sigmoid", "kto"], max_steps=3, learning_rate=1e-4), train_dataset=pairs)


def test_kto_on_a_paired_dataset_names_the_missing_columns(tmp_path, sd_path, pairs):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image', 'label'\]"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="kto", max_steps=3, learning_rate=1e-4), train_dataset=pairs)


@pytest.mark.parametrize(
    "prompts,labels,match",
    [
        (["a", "b"], [1, 0], r"Row 0, column 'label': expected a bool .* got 1 of type int"),
        ([["a"], ["b"]], [True, False], r"Row 0, column 'prompt': expected a string, got list"),
        ([], [], "empty"),
    ],
)
def test_bad_unpaired_rows_are_named(tmp_path, sd_path, labelled, prompts, labels, match):
    rows = [{"prompt": p, "image": labelled[0]["image"], "label": l} for p, l in zip(prompts, labels)]
    data = Dataset.from_list(rows) if rows else labelled.select([])
    with pytest.raises(ValueError, match=match):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="kto", max_steps=3, learning_rate=1e-4), train_dataset=data)


def test_undecodable_unpaired_image_names_row_and_column(tmp_path, sd_path):
    data = Dataset.from_dict({"prompt": ["a", "b"], "image": [b"not an image", b"x"], "label": [True, False]})
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="kto", max_steps=3, learning_rate=1e-4), train_dataset=data)
    with pytest.raises(ValueError, match=r"Row 1, column 'image': could not read an image"):
        trainer.data_collator([trainer.train_dataset[1]])
