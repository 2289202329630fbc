"""Encoders around the caches: on the accelerator only while they encode, with the denoiser aside meanwhile, and with
`release_cached_encoders` dropped (garbage-collected) once the cache exists; training and saving go on without them."""

import gc
import weakref

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import LN2, lora, losses_of, make_args
from peft import get_peft_model_state_dict

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.testing import make_flux2_klein_pipeline


@pytest.fixture(scope="module")
def klein_path(tmp_path_factory):
    return make_flux2_klein_pipeline(tmp_path_factory.mktemp("klein_release") / "pipe")


@pytest.mark.parametrize("fixture", ["sdxl_path", "klein_path"])
def test_released_encoders_are_garbage_collected_and_training_and_saving_go_on(tmp_path, fixture, pairs, request):
    path = request.getfixturevalue(fixture)
    pipe = DiffusionPipeline.from_pretrained(path)
    encoders = [pipe.vae] + [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)]
    refs = [weakref.ref(module) for module in encoders]
    del encoders
    args = make_args(tmp_path, precompute_latents=True, precompute_text_embeddings=True, release_cached_encoders=True)
    trainer = DiffusionDPOTrainer(model=pipe, args=args, train_dataset=pairs, eval_dataset=pairs.select(range(2)),
                                  peft_config=lora(target_modules=None))
    del pipe
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs), "a released encoder is still referenced"
    assert trainer.family.frozen_modules == [] and trainer.pipeline.vae is None
    assert trainer.pipeline.config.vae == (None, None)  # the pipeline knows, as after `from_pretrained(vae=None)`

    trainer.train()
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    assert "eval_loss" in trainer.evaluate()
    trainer.save_model()
    with pytest.raises(ValueError, match=r"VAE was released.*reload the pipeline"):
        trainer.evaluate(eval_dataset=pairs.select(range(2)))  # not cached: it would need the VAE
    fresh = DiffusionPipeline.from_pretrained(path)
    fresh.load_lora_weights(args.output_dir, adapter_name="dpo")
    assert get_peft_model_state_dict(fresh.components[trainer.family.denoiser_name], adapter_name="dpo").keys() == \
        get_peft_model_state_dict(trainer.family.denoiser).keys()


def test_without_release_the_encoders_stay_on_the_cpu(tmp_path, klein_path, pairs):
    args = make_args(tmp_path, precompute_latents=True, precompute_text_embeddings=True)
    trainer = DiffusionDPOTrainer(model=klein_path, args=args, train_dataset=pairs, peft_config=lora(target_modules=None))
    frozen = trainer.family.frozen_modules
    assert len(frozen) == 2 and all(p.device.type == "cpu" for m in frozen for p in m.parameters())


def test_the_denoiser_waits_off_the_device_while_the_encoders_run(tmp_path, klein_path, pairs):
    """The order of events during construction: the denoiser moves to the CPU before the first encoder call and back
    to its device after the last (on this CPU-only machine both places are the CPU, so the moves are what we see)."""
    pipe = DiffusionPipeline.from_pretrained(klein_path)
    events = []
    transformer_to = pipe.transformer.to

    def record_move(*args, **kwargs):
        events.append(("transformer.to", str(args[0] if args else kwargs.get("device"))))
        return transformer_to(*args, **kwargs)

    pipe.transformer.to = record_move
    for name, module in (("vae", pipe.vae.encoder), ("text_encoder", pipe.text_encoder)):
        module.register_forward_pre_hook(lambda m, a, n=name: events.append((n, "forward")))
    args = make_args(tmp_path, precompute_latents=True, precompute_text_embeddings=True)
    DiffusionDPOTrainer(model=pipe, args=args, train_dataset=pairs, peft_config=lora(target_modules=None))
    encodes = [i for i, event in enumerate(events) if event[1] == "forward"]
    aside = events.index(("transformer.to", "cpu"))
    back = max(i for i, event in enumerate(events) if event[0] == "transformer.to")
    assert {events[i][0] for i in encodes} == {"vae", "text_encoder"}
    assert aside < min(encodes) and max(encodes) < back
    assert events[back] == ("transformer.to", str(torch.device("cpu")))  # back where it was (this machine: the CPU)
