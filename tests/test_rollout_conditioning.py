"""A rollout samples with the family's own conditioning (`pipeline_prompt_kwargs`, `unconditional_conditioning`), so
training conditions on the tensors the images were sampled with: for every family it draws exactly the images the
pipeline draws from the prompt strings, without guidance and with the pipeline's own classifier-free guidance (SDXL's
zeroed negative, Sana's negative without its instruction, Z-Image's guidance above 0), and with a text cache it never
runs a text encoder."""

import datasets
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import make_args

from diffusion_dpo_trainer.caching import precompute_prompt_embeddings
from diffusion_dpo_trainer.families import REGISTRY, load_family
from diffusion_dpo_trainer.rollout import rollout
from diffusion_dpo_trainer.sampling import iter_sample_batches
from diffusion_dpo_trainer.testing import TINY_BUILDERS, TINY_CALL_KWARGS

PROMPTS = ["a red square", "a blue circle on a green field", "a red square"]
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def family(request, tmp_path_factory):
    """A family on its tiny pipeline, its prompt length the one the tiny pipeline samples with."""
    name = request.param
    path = TINY_BUILDERS[name](tmp_path_factory.mktemp(name) / "pipe")
    length = TINY_CALL_KWARGS.get(name, {}).get("max_sequence_length")
    return load_family(DiffusionPipeline.from_pretrained(path),
                       make_args(tmp_path_factory.mktemp("args"), max_prompt_length=length))


def call_kwargs(family, guidance_scale):
    return {"num_inference_steps": 2, "guidance_scale": guidance_scale,
            **TINY_CALL_KWARGS.get(type(family.pipeline).__name__, {})}


def pipeline_latents(family, **kwargs):
    """The final latents of the pipeline called with the prompt strings, in the family's training layout."""
    [(_, latents)] = iter_sample_batches(family.pipeline, PROMPTS, SEEDS, len(PROMPTS), progress=False,
                                         return_latents=True, output_type="latent", height=32, width=32, **kwargs)
    return family.sampled_latents(latents, 32).float()


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_the_familys_conditioning_samples_the_pipelines_own_images(family, guidance_scale):
    """... and `family.guidance` says what the pipeline does: its denoiser sees an unconditional row per image at each
    step (in the batch or in a second forward) exactly where the hook answers "cfg" (Z-Image at 1.0 too)."""
    kwargs = call_kwargs(family, guidance_scale)
    rows = []
    handle = family.denoiser.register_forward_pre_hook(
        lambda module, args, kw: rows.append(len(kw["hidden_states"] if "hidden_states" in kw else args[0])),
        with_kwargs=True)
    try:
        result = rollout(family, PROMPTS, SEEDS, 32, decode=False, **kwargs)
    finally:
        handle.remove()
    branches = 2 if family.guidance(guidance_scale) == "cfg" else 1
    assert sum(rows) == len(family.pipeline.scheduler.timesteps) * len(PROMPTS) * branches
    assert torch.equal(result.latents, pipeline_latents(family, **kwargs))


def test_with_a_text_cache_no_text_encoder_runs(family, monkeypatch):
    """Embeddings from the cache (as a trainer passes them) sample the same images; a text encoder is never called,
    except Sana's for its negative, which its pipeline encodes without the prompt instruction (not cacheable)."""
    name = type(family.pipeline).__name__
    cache = precompute_prompt_embeddings([datasets.Dataset.from_dict({"prompt": PROMPTS})], family,
                                         torch.device("cpu"), extra_prompts=[""])
    guidance = 1.0 if name == "SanaPipeline" else 2.0
    kwargs = call_kwargs(family, guidance)
    expected = pipeline_latents(family, **kwargs)
    for encoder in family.text_encoders:
        monkeypatch.setattr(encoder, "forward", _refuse)
    result = rollout(family, PROMPTS, SEEDS, 32, decode=False, encode=cache, **kwargs)
    torch.testing.assert_close(result.latents, expected)


def _refuse(*args, **kwargs):
    raise AssertionError("a text encoder ran although the prompts' embeddings were cached")
