"""Facts of the flow-matching families (SD3/SD3.5 and FLUX.1): noising, timestep sampling, guidance, beta, examples.

What every family must do (LoRA, reference inputs, saving, caching) is in test_family_conformance.py."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
)
from helpers import LN2, losses_of, make_args, parse_recipe
from helpers import lora as _lora

from diffusion_dpo_trainer import DiffusionDPOTrainer, cli
from diffusion_dpo_trainer.families import FluxFamily, StableDiffusion3Family, load_family
from diffusion_dpo_trainer.testing import make_flux_pipeline

FAMILIES = ("flux_path", "sd3_path")


@pytest.fixture(scope="module")
def flux_guidance_path(tmp_path_factory):
    """A FLUX.1-dev-like (guidance-distilled) tiny pipeline."""
    return make_flux_pipeline(tmp_path_factory.mktemp("flux_dev") / "pipe", guidance_embeds=True)


def family_lora(**overrides):
    # No target_modules: the family's documented defaults apply.
    return _lora(target_modules=None, **overrides)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_flow_noising_matches_hand_computation_and_scheduler(fixture, request):
    path = request.getfixturevalue(fixture)
    family = load_family(path, args=make_args(Path("unused")))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    torch.manual_seed(0)
    timesteps = family.sample_timesteps(6, torch.device("cpu"))
    x0, noise = torch.randn(6, 16, 8, 8), torch.randn(6, 16, 8, 8)
    noisy, target = family.noisy_latents_and_target(x0, noise, timesteps)

    # The sigma the scheduler assigns to each sampled timestep (which must be on its training schedule).
    index = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    s = scheduler.sigmas[index].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(noisy, scheduler.scale_noise(x0, timesteps, noise))
    # The denoiser sees t = 1000 s; SD3's schedule is shifted (s = 3b / (1 + 2b) on a grid b = k/1000), FLUX's is not
    # (its shift depends on the resolution and is applied at inference only).
    s = s.flatten()
    torch.testing.assert_close(timesteps, 1000 * s)
    grid = s / (3 - 2 * s) if fixture == "sd3_path" else s
    torch.testing.assert_close(grid * 1000, (grid * 1000).round(), atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "options, check",
    [
        # u ~ U(0, 1): the unshifted FLUX sigma = 1 - floor(1000 u)/1000 is uniform too.
        (dict(weighting_scheme="uniform"), lambda s: (s.mean(), s.std(), 0.5, math.sqrt(1 / 12))),
        # u = sigmoid(N(0.5, 0.7)): logit(1 - sigma) ~ N(0.5, 0.7).
        (dict(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.7),
         lambda s: (torch.logit(1 - s, eps=1e-4).mean(), torch.logit(1 - s, eps=1e-4).std(), 0.5, 0.7)),
    ],
)
def test_weighting_scheme_sets_the_sigma_distribution(tmp_path, flux_path, options, check):
    family = load_family(flux_path, args=make_args(tmp_path, **options))
    torch.manual_seed(0)
    sigmas = family.sigmas_for(family.sample_timesteps(20000, torch.device("cpu")))
    mean, std, expected_mean, expected_std = check(sigmas)
    assert float(mean) == pytest.approx(expected_mean, abs=0.03)
    assert float(std) == pytest.approx(expected_std, abs=0.03)


def test_density_maps_to_schedule_ends(tmp_path, flux_path, monkeypatch):
    """u = 0 is the noisiest training step (t = 1000, s = 1); u = 1 (reachable by `mode`) clamps to the last one."""
    import diffusion_dpo_trainer.families.flow as flow

    family = load_family(flux_path, args=make_args(tmp_path, weighting_scheme="mode"))
    monkeypatch.setattr(flow, "compute_density_for_timestep_sampling", lambda **_: torch.tensor([0.0, 1.0]))
    timesteps = family.sample_timesteps(2, torch.device("cpu"))
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 1.0]))
    torch.testing.assert_close(family.sigmas_for(timesteps), torch.tensor([1.0, 0.001]))


def test_unknown_weighting_scheme_is_named(tmp_path, flux_path):
    args = make_args(tmp_path)
    args.weighting_scheme = "cosmap"
    with pytest.raises(ValueError, match=r"'cosmap'.*uniform, logit_normal, mode"):
        load_family(flux_path, args=args)


def test_guidance_distilled_flux_lora_bf16_8bit_checkpointing(tmp_path, flux_guidance_path, pairs):
    """FLUX.1-dev-like: the configured guidance reaches the transformer; the consumer-GPU recipe runs on CPU."""
    import bitsandbytes as bnb

    args = make_args(tmp_path, guidance_scale=2.0, bf16=True, use_cpu=True, optim="adamw_bnb_8bit",
                     gradient_checkpointing=True)
    trainer = DiffusionDPOTrainer(model=flux_guidance_path, args=args, train_dataset=pairs, peft_config=family_lora())
    transformer = trainer.family.denoiser
    assert transformer.config.guidance_embeds and transformer.is_gradient_checkpointing
    guidance = []
    handle = transformer.register_forward_pre_hook(lambda m, a, kw: guidance.append(kw["guidance"]), with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()

    assert len(guidance) == 2 * args.max_steps
    for value in guidance:
        torch.testing.assert_close(value, torch.full((2 * args.per_device_train_batch_size,), 2.0))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit) and optimizer.args.optim_bits == 8
    params = dict(transformer.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in params.items() if "lora" in n)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if "lora" not in n)
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    assert all(math.isfinite(x) for x in losses_of(trainer))


def test_flux_without_guidance_embeds_gets_no_guidance(tmp_path, flux_path, pairs):
    trainer = DiffusionDPOTrainer(model=flux_path, args=make_args(tmp_path, max_steps=1), train_dataset=pairs,
                                  peft_config=family_lora())
    seen = []
    trainer.family.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    trainer.train()
    assert seen and all(g is None for g in seen)


def test_beta_defaults_per_family_and_explicit_beta_wins(tmp_path, sd_path, sd3_path, flux_path, pairs):
    for path, expected in ((sd_path, 5000.0), (sd3_path, StableDiffusion3Family.default_beta),
                           (flux_path, FluxFamily.default_beta)):
        trainer = DiffusionDPOTrainer(model=path, args=make_args(tmp_path), train_dataset=pairs)
        assert trainer.args.beta is None and trainer.beta == expected
    assert (StableDiffusion3Family.default_beta, FluxFamily.default_beta) == (500.0, 1000.0)
    trainer = DiffusionDPOTrainer(model=flux_path, args=make_args(tmp_path, beta=5000), train_dataset=pairs)
    assert trainer.beta == 5000.0


def test_the_loss_receives_the_resolved_beta(tmp_path, sd3_path, pairs, monkeypatch):
    import diffusion_dpo_trainer.trainer as trainer_module

    seen, original = [], trainer_module.losses.compute_paired_loss

    def spy(loss_types, policy_mse, ref_mse, params, **stabilisers):
        seen.append(params.beta)
        return original(loss_types, policy_mse, ref_mse, params, **stabilisers)

    monkeypatch.setattr(trainer_module.losses, "compute_paired_loss", spy)
    trainer = DiffusionDPOTrainer(model=sd3_path, args=make_args(tmp_path, max_steps=1), train_dataset=pairs,
                                  peft_config=family_lora())
    trainer.train()
    assert seen == [StableDiffusion3Family.default_beta]


# ----- the recipes: examples/*.yaml as `diffusion-dpo train --config` reads them ----------------------------------
@pytest.mark.parametrize(
    "name, model_id, beta",
    [("sd35_lora_pickapic", "stabilityai/stable-diffusion-3.5-medium", 500.0),
     ("flux_lora_pickapic", "black-forest-labs/FLUX.1-dev", 1000.0)],
)
def test_recipe_is_the_recommended_one(name, model_id, beta):
    options, config = parse_recipe(name)
    assert options.model_name_or_path == model_id and options.dataset_name == "yuvalkirstain/pickapic_v2"
    assert config.beta == beta and config.bf16 and config.gradient_checkpointing
    assert config.resolution == 1024
    assert config.optim == "adamw_bnb_8bit" and config.weighting_scheme == "logit_normal"
    assert config.model_init_kwargs == {"torch_dtype": "bfloat16"}
    assert set(options.lora_target_modules) == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                "add_v_proj", "to_add_out"}
    assert options.lora_r == options.lora_alpha == 16 and not options.full_finetune


@pytest.mark.parametrize("name", ["sd35_lora_pickapic", "flux_lora_pickapic", "flux2_klein_lora_pickapic",
                                  "flux2_dev_lora_pickapic"])
def test_recipes_stream_by_default_and_read_local_files(tmp_path, name):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"caption": f"p{i}"}) for i in range(5)))

    def load(*flags):  # the CLI's own load call, on the recipe pointed at a local file
        options, config = parse_recipe(name, "--dataset_name", str(rows), *flags)
        if options.dataset_streaming:
            cli._check_streaming_options(options, config)  # what `train` checks before anything is downloaded
        return cli.load_split(options.dataset_name, options.dataset_config, options.dataset_train_split,
                              options.dataset_streaming)

    streamed = load()
    assert type(streamed).__name__ == "IterableDataset"
    assert [row["caption"] for row in itertools.islice(streamed, 3)] == ["p0", "p1", "p2"]
    stored = load("--dataset_streaming", "false", "--dataset_train_split", "train[:3]")
    assert type(stored).__name__ == "Dataset" and [row["caption"] for row in stored] == ["p0", "p1", "p2"]


def test_recipe_flags_override_the_file():
    options, config = parse_recipe(
        "flux_lora_pickapic", "--output_dir", "o", "--beta", "2000", "--learning_rate", "2e-6", "--guidance_scale",
        "1.0", "--dataset_train_split", "train[:100]", "--resolution", "512", "--weighting_scheme", "uniform",
        "--lora_target_modules", "to_q", "to_v", "--lora_r", "8",
    )
    assert (config.output_dir, config.beta, config.learning_rate) == ("o", 2000.0, 2e-6)
    assert (config.guidance_scale, config.resolution, config.weighting_scheme) == (1.0, 512, "uniform")
    assert options.dataset_train_split == "train[:100]"
    assert set(options.lora_target_modules) == {"to_q", "to_v"} and options.lora_r == 8
    assert parse_recipe("flux_lora_pickapic", "--full_finetune", "true")[0].full_finetune
    with pytest.raises(SystemExit):
        parse_recipe("flux_lora_pickapic", "--weighting_scheme", "cosmap")
