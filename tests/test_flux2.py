"""FLUX.2 [dev] (Flux2Pipeline) and [klein] (Flux2KleinPipeline) on tiny offline pipelines, beyond the conformance
suite: the latent normalisation and packing against the pipeline's own code, the default LoRA targets, guidance, the
native resolution, and the recipe."""

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from helpers import lora, make_args, parse_recipe

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.families import load_family
from diffusion_dpo_trainer.families.flux2 import Flux2Family
from diffusion_dpo_trainer.quantization import pipeline_quantization_config
from diffusion_dpo_trainer.testing import make_flux2_klein_pipeline, make_flux2_pipeline

PIPELINES = {"Flux2Pipeline": (Flux2Pipeline, make_flux2_pipeline),
             "Flux2KleinPipeline": (Flux2KleinPipeline, make_flux2_klein_pipeline)}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def flux2(request, tmp_path_factory):
    """(pipeline class, saved tiny pipeline path) for each FLUX.2 variant."""
    pipeline_class, build = PIPELINES[request.param]
    return pipeline_class, build(tmp_path_factory.mktemp(request.param) / "pipe")


def test_latents_are_normalised_as_the_pipeline_encodes_images(tmp_path, flux2):
    """Patchify + batch-norm statistics, checked against Flux2Pipeline's own `_encode_vae_image` (which takes the
    distribution's mode, i.e. our mean); the tiny VAE has non-trivial statistics, so a missing step changes values."""
    family = load_family(flux2[1], args=make_args(tmp_path))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, _ = family.encode_pixels(pixels)
    ours = family.scale_latents(mean)
    theirs = family.pipeline._encode_vae_image(pixels, generator=None)
    assert ours.shape == (2, 16, 8, 8)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, type(family.pipeline)._patchify_latents(mean), atol=1e-2)


def test_predict_packs_and_unpacks_like_the_pipeline(tmp_path, flux2):
    """One transformer call as Flux2Pipeline makes it (packed tokens, 4-axis ids, t/1000, guidance for [dev]),
    unpacked with the pipeline's `_unpack_latents_with_ids`, equals `predict` on the (B, C, H, W) latents."""
    pipeline_class, path = flux2
    family = load_family(path, args=make_args(tmp_path, guidance_scale=2.5))
    pipe = family.pipeline
    torch.manual_seed(0)
    latents, timesteps = torch.randn(2, 16, 4, 6), torch.tensor([500.0, 250.0])
    text = family.encode_prompt(["a red cat", "a blue dog"], torch.device("cpu"))["encoder_hidden_states"]
    with torch.no_grad():
        ours = family.predict(family.denoiser, latents, timesteps, {"encoder_hidden_states": text})
        packed, latent_ids = pipe.prepare_latents(2, 4, 8, 12, latents.dtype, "cpu", None, latents=latents)
        guidance = torch.full([2], 2.5) if pipeline_class is Flux2Pipeline else None
        tokens = family.denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                 encoder_hidden_states=text, txt_ids=pipe._prepare_text_ids(text),
                                 img_ids=latent_ids, return_dict=False)[0]
    torch.testing.assert_close(ours, pipeline_class._unpack_latents_with_ids(tokens, latent_ids))


def test_default_lora_targets_reach_every_single_block_output_projection(tmp_path, flux2, pairs):
    """The single-stream blocks' `attn.to_out` is named per block (the bare name would hit the double blocks'
    ModuleList): every one of them, and the fused input projection, gets an adapter."""
    trainer = DiffusionDPOTrainer(model=flux2[1], args=make_args(tmp_path), train_dataset=pairs,
                                  peft_config=lora(target_modules=None))
    for block in trainer.family.denoiser.single_transformer_blocks:
        assert hasattr(block.attn.to_out, "lora_A") and hasattr(block.attn.to_qkv_mlp_proj, "lora_A")
    assert not hasattr(trainer.family.denoiser.transformer_blocks[0].attn.to_out, "lora_A")  # the ModuleList
    assert hasattr(trainer.family.denoiser.transformer_blocks[0].attn.to_out[0], "lora_A")


def test_guidance_reaches_the_transformer_only_where_the_checkpoint_embeds_it(tmp_path, flux2, pairs):
    pipeline_class, path = flux2
    args = make_args(tmp_path, max_steps=1, guidance_scale=2.0)
    trainer = DiffusionDPOTrainer(model=path, args=args, train_dataset=pairs, peft_config=lora(target_modules=None))
    seen = []
    trainer.family.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    trainer.train()
    assert len(seen) == 2
    if pipeline_class is Flux2Pipeline:  # [dev]: guidance-distilled
        assert trainer.family.denoiser.config.guidance_embeds
        for value in seen:
            torch.testing.assert_close(value, torch.full((2 * args.per_device_train_batch_size,), 2.0))
    else:
        assert not trainer.family.denoiser.config.guidance_embeds and all(g is None for g in seen)


def test_default_beta_and_native_resolution(tmp_path, flux2, pairs):
    trainer = DiffusionDPOTrainer(model=flux2[1], args=make_args(tmp_path, resolution=None), train_dataset=pairs)
    assert trainer.beta == Flux2Family.default_beta == 1000.0
    # FLUX.2's pipelines default to 128 latent pixels x the VAE factor (1024 px with the real 8x VAE).
    assert trainer.resolution == 128 * trainer.family.vae_scale_factor


# ----- the recipes: examples/flux2_*.yaml as `diffusion-dpo train --config` reads them ----------------------------
@pytest.mark.parametrize("variant, model_id", [("dev", "black-forest-labs/FLUX.2-dev"),
                                               ("klein", "black-forest-labs/FLUX.2-klein-base-4B")])
def test_recipe_defaults(variant, model_id):
    options, config = parse_recipe(f"flux2_{variant}_lora_pickapic")
    assert options.model_name_or_path == model_id and not options.full_finetune
    assert config.beta == Flux2Family.default_beta and config.bf16 and config.gradient_checkpointing
    assert config.resolution == 1024 and config.optim == "adamw_bnb_8bit"
    assert config.output_dir == f"flux2-{variant}-dpo-lora"
    assert options.lora_target_modules is None and options.lora_r == 16  # the family's default targets
    quantization = config.model_init_kwargs.get("quantization_config")
    if variant == "dev":  # the 32B transformer and the 24B text encoder in 4-bit; trained at the sampling guidance
        config_ = pipeline_quantization_config(quantization, "transformer")
        assert config_.quant_kwargs["load_in_4bit"] and config_.components_to_quantize == ["transformer", "text_encoder"]
        assert config.guidance_scale == 4.0
    else:
        assert quantization is None


def test_recipe_flags_override_the_file():
    options, config = parse_recipe("flux2_dev_lora_pickapic", "--model_init_kwargs", "{}",
                                   "--precompute_text_embeddings", "True", "--release_cached_encoders", "True",
                                   "--model_name_or_path", "local/flux2", "--lora_r", "8")
    assert config.model_init_kwargs == {} and config.precompute_text_embeddings
    assert config.release_cached_encoders
    assert options.model_name_or_path == "local/flux2" and options.lora_r == 8
