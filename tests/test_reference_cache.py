"""precompute_ref_errors: the reference runs once before training, on the draws training repeats, and never again."""

import gc

import datasets
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from helpers import LN2, lora, make_args

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.reference_cache import DrawEpochCallback, RowDraws

CACHED = {"precompute_latents": True, "precompute_text_embeddings": True}


def losses_of(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.fixture(scope="module")
def labelled(pairs):
    n = len(pairs)
    features = Features({"prompt": Value("string"), "image": ImageFeature(), "label": Value("bool")})
    return Dataset.from_dict({"prompt": list(pairs["prompt"]) * 2, "image": list(pairs["chosen"]) + list(pairs["rejected"]),
                              "label": [True] * n + [False] * n}, features=features)


def with_row_draws(trainer):
    """The inline-reference run on the same per-(seed, row, epoch) draws: the reference runs in every step."""
    draws = RowDraws(trainer.args.seed, trainer.family.sample_timesteps, trainer.args.random_flip)
    trainer.data_collator.draws = draws
    trainer.add_callback(DrawEpochCallback(draws))
    return draws


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto"])
def test_precomputed_errors_give_the_inline_reference_losses_over_two_epochs(tmp_path, sd_path, pairs, labelled,
                                                                             loss_type):
    """Full fine-tune (the losses move), flips on, 8 rows / 2 per step / 6 steps = 2 epochs: every step's loss and
    reference errors equal those of a run that runs its frozen copy inline on the same draws."""
    data = pairs if loss_type == "sigmoid" else labelled
    steps = 6 if loss_type == "sigmoid" else 10
    runs = {}
    for precompute in (True, False):
        args = make_args(tmp_path / str(precompute), loss_type=loss_type, max_steps=steps, random_flip=True,
                         precompute_ref_errors=precompute, **CACHED)
        trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=data)
        if precompute:
            assert trainer.ref_model is None
            errors = trainer.train_dataset[:]["ref_mse"]
            assert errors.shape == (len(data), 2, 2 if loss_type == "sigmoid" else 1)  # rows, epochs, images
            assert not torch.allclose(errors[:, 0], errors[:, 1])  # each epoch has its own draws
        else:
            assert trainer.ref_model is not None
            draws = with_row_draws(trainer)
        trainer.train()
        runs[precompute] = {key: losses_of(trainer, key) for key in ("loss", "ref_mse/chosen", "ref_mse/rejected")}
    assert draws.epoch == 1  # the inline run did reach its second epoch's draws
    for key, values in runs[False].items():
        assert runs[True][key] == pytest.approx(values, abs=1e-5), key
    if loss_type == "sigmoid":
        assert runs[True]["loss"][0] == pytest.approx(LN2, abs=1e-6)  # the policy starts as the reference
    assert len({round(v, 4) for v in runs[True]["loss"]}) > 2  # the model did train


def test_stored_errors_are_the_reference_error_on_the_rows_draws(tmp_path, sd_path, pairs):
    """Recompute one row's stored error for epoch 1 directly with diffusers: DDPM noising, the UNet, CLIP."""
    args = make_args(tmp_path, max_steps=8, random_flip=True, precompute_ref_errors=True, **CACHED)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora())
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, feature_extractor=None)
    scheduler = DDPMScheduler.from_pretrained(sd_path, subfolder="scheduler")
    row = trainer.train_dataset[5]
    draws = RowDraws(0, trainer.family.sample_timesteps, True)
    draws.epoch = 1
    draw = draws(int(row["row_index"]), tuple(row["chosen_latent_mean"].shape), 2)
    suffix = "_flipped" if draw["flip"] else ""
    x0 = torch.stack([row[f"{side}_latent_mean{suffix}"] + row[f"{side}_latent_std{suffix}"] * eps
                      for side, eps in zip(("chosen", "rejected"), draw["latent_eps"])]) * pipe.vae.config.scaling_factor
    noise = draw["noise"].expand_as(x0)
    timesteps = draw["timesteps"].repeat(2)
    ids = pipe.tokenizer([row["prompt"]] * 2, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        prediction = pipe.unet(scheduler.add_noise(x0, noise, timesteps), timesteps,
                               encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    expected = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(row["ref_mse"][1], expected, atol=1e-5, rtol=1e-5)


def _denoisers_alive() -> list[UNet2DConditionModel]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, UNet2DConditionModel)]


def test_full_fine_tune_holds_one_denoiser(tmp_path, sd_path, pairs):
    counts = {}
    for precompute in (False, True):
        before = {id(u) for u in _denoisers_alive()}
        args = make_args(tmp_path / str(precompute), precompute_ref_errors=precompute, **CACHED)
        trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs)
        trainer.train()
        new = [u for u in _denoisers_alive() if id(u) not in before]
        counts[precompute] = (len(new), sum(p.numel() for u in new for p in u.parameters()))
        size = sum(p.numel() for p in trainer.model.parameters())
        assert (trainer.ref_model is None) == precompute
        del trainer, new
    assert counts[False] == (2, 2 * size)  # policy and frozen copy
    assert counts[True] == (1, size)  # the policy only


def test_lora_step_runs_one_denoiser_forward(tmp_path, sd_path, pairs):
    calls = {}
    for precompute in (False, True):
        args = make_args(tmp_path / str(precompute), max_steps=3, precompute_ref_errors=precompute, **CACHED)
        trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora())
        calls[precompute] = 0

        def count(*_, precompute=precompute):
            calls[precompute] += 1

        trainer.model.register_forward_pre_hook(count)
        trainer.train()
    assert calls == {False: 6, True: 3}  # policy + reference per step; the policy alone


def test_cache_is_reused_across_a_sweep_and_rebuilt_when_its_inputs_change(tmp_path, sd_path, pairs, monkeypatch):
    pairs.save_to_disk(str(tmp_path / "pairs"))

    def run(model=sd_path, data=None, name="a", **overrides):
        data = data if data is not None else datasets.load_from_disk(str(tmp_path / "pairs"))
        args = make_args(tmp_path / name, precompute_ref_errors=True, **{**CACHED, **overrides})
        return DiffusionDPOTrainer(model=model, args=args, train_dataset=data, peft_config=lora())

    first = run()
    cache_file = first.train_dataset.cache_files[0]["filename"]
    stored = first.train_dataset[:]["ref_mse"]

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran again although its errors are cached")

    monkeypatch.setattr(UNet2DConditionModel, "forward", fail)
    sweep = run(name="b", beta=1000, learning_rate=1e-4)  # another beta and learning rate: same errors
    assert sweep.train_dataset.cache_files[0]["filename"] == cache_file
    monkeypatch.undo()
    sweep.train()  # and it trains from them
    torch.testing.assert_close(sweep.train_dataset[:]["ref_mse"], stored)

    other_weights = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, feature_extractor=None)
    with torch.no_grad():
        next(other_weights.unet.parameters()).view(-1)[0] += 1e-2
    other_weights.save_pretrained(tmp_path / "other")
    rebuilt = {
        "weights": run(model=str(tmp_path / "other"), name="w"),
        "seed": run(name="s", seed=1),
        "resolution": run(name="r", resolution=16),
        "data": run(name="d", data=datasets.load_from_disk(str(tmp_path / "pairs")).select(range(6))),
        "epochs": run(name="e", max_steps=8),
    }
    for what, trainer in rebuilt.items():
        assert trainer.train_dataset.cache_files[0]["filename"] != cache_file, what
    assert not torch.allclose(rebuilt["weights"].train_dataset[:]["ref_mse"], stored)


def test_precompute_ref_errors_refuses_what_it_cannot_do(tmp_path, sd_path, pairs):
    with pytest.raises(ValueError, match="needs precompute_latents=True"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, precompute_ref_errors=True), train_dataset=pairs)
    with pytest.raises(ValueError, match="loss_type 'mapo' uses no reference"):
        DiffusionDPOTrainer(model=sd_path, train_dataset=pairs, args=make_args(
            tmp_path, loss_type="mapo", precompute_ref_errors=True, precompute_latents=True))


def test_evaluation_uses_fixed_draws(tmp_path, sd_path, pairs):
    args = make_args(tmp_path, precompute_ref_errors=True, **CACHED)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, eval_dataset=pairs.select(range(4)),
                                  peft_config=lora())
    assert trainer.eval_dataset[:]["ref_mse"].shape == (4, 1, 2)
    first, again = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
    assert first == again == pytest.approx(LN2, abs=1e-6)  # a LoRA policy still equals its reference
