"""The tiny pipelines must load, generate and take LoRA adapters through diffusers' real code paths."""

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffusion_dpo_trainer import testing

BUILDS = {
    "sd": (testing.make_sd_pipeline, {}, StableDiffusionPipeline),
    "sd-vpred": (testing.make_sd_pipeline, {"prediction_type": "v_prediction"}, StableDiffusionPipeline),
    "sdxl": (testing.make_sdxl_pipeline, {}, StableDiffusionXLPipeline),
    "sd3": (testing.make_sd3_pipeline, {}, StableDiffusion3Pipeline),
    "flux": (testing.make_flux_pipeline, {}, FluxPipeline),
    "flux-guidance": (testing.make_flux_pipeline, {"guidance_embeds": True}, FluxPipeline),
}


@pytest.fixture(scope="module", params=list(BUILDS))
def built(request, tmp_path_factory):
    builder, kwargs, pipeline_cls = BUILDS[request.param]
    path = builder(tmp_path_factory.mktemp(request.param), **kwargs)
    return path, kwargs, pipeline_cls


def _generate(pipe):
    return pipe(
        prompt="a red cat",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def _denoiser_name(pipe):
    return "unet" if "unet" in pipe.components else "transformer"


def test_pipeline_loads_and_generates(built):
    path, kwargs, pipeline_cls = built
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe) is pipeline_cls
    assert pipe.vae_scale_factor == 2
    if "prediction_type" in kwargs:
        assert pipe.scheduler.config.prediction_type == kwargs["prediction_type"]
    if pipeline_cls is not FluxPipeline:
        # Pipelines derive their default resolution from the denoiser config.
        assert getattr(pipe, _denoiser_name(pipe)).config.sample_size * pipe.vae_scale_factor == 32

    images = _generate(pipe)
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


def test_lora_save_load_round_trip(built, tmp_path):
    path, _, pipeline_cls = built
    pipe = DiffusionPipeline.from_pretrained(path)
    name = _denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # LoRA B starts at zero; random weights make the comparison below meaningful.
    torch.manual_seed(0)
    with torch.no_grad():
        for param_name, param in denoiser.named_parameters():
            if "lora_" in param_name:
                param.normal_(std=0.1)
    saved = get_peft_model_state_dict(denoiser)
    assert saved

    pipeline_cls.save_lora_weights(tmp_path, **{f"{name}_lora_layers": convert_state_dict_to_diffusers(saved)})
    fresh = DiffusionPipeline.from_pretrained(path)
    fresh.load_lora_weights(tmp_path, adapter_name="dpo")

    loaded = get_peft_model_state_dict(getattr(fresh, name), adapter_name="dpo")
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value)
    np.testing.assert_allclose(_generate(fresh), _generate(pipe), atol=1e-5)


def test_builds_are_deterministic_and_leave_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    paths = [testing.make_flux_pipeline(tmp_path / name, seed=seed) for name, seed in [("a", 0), ("b", 0), ("c", 1)]]
    assert torch.equal(torch.rand(3), expected)

    weights = [(tmp_path / p / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() for p in paths]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_clip_tokenizer_handles_any_prompt(tmp_path):
    tokenizer = testing.write_clip_tokenizer(tmp_path)
    assert tokenizer.model_max_length == 77
    assert tokenizer.convert_ids_to_tokens(tokenizer("a photo of a handwritten digit").input_ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "handwritten</w>", "digit</w>", "<|endoftext|>",
    ]  # fmt: skip
    for word in testing.common._WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]

    ids = tokenizer("Zebra, 7 CRÈME brûlée!? 日本 " * 20, padding="max_length", truncation=True).input_ids
    assert len(ids) == 77
    # The unk token is <|endoftext|>: it must appear only where the sequence ends.
    assert ids[1:-1].count(tokenizer.eos_token_id) == 0

    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded("a red cat").input_ids == tokenizer("a red cat").input_ids


def test_clip_tokenizer_custom_vocabulary(tmp_path):
    tokenizer = testing.write_clip_tokenizer(tmp_path, vocab_words=["zebra", "Okapi"])
    assert tokenizer.tokenize("zebra okapi") == ["zebra</w>", "okapi</w>"]
    with pytest.raises(ValueError, match="ASCII letters"):
        testing.write_clip_tokenizer(tmp_path / "bad", vocab_words=["t-shirt"])


def test_t5_tokenizer_pads_and_truncates(tmp_path):
    tokenizer = testing.write_t5_tokenizer(tmp_path)
    encoded = tokenizer(
        ["a red cat", "Zebra, 7 crème brûlée!? " * 10],
        padding="max_length",
        max_length=16,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    assert encoded.input_ids.shape == (2, 16)
    short = encoded.input_ids[0].tolist()
    assert tokenizer.convert_ids_to_tokens(short[:4]) == ["\u2581a", "\u2581red", "\u2581cat", "</s>"]
    assert short[4:] == [tokenizer.pad_token_id] * 12
    assert encoded.input_ids[1, -1] == tokenizer.eos_token_id


def test_preference_dataset(tmp_path):
    dataset = testing.make_preference_dataset(n=10, size=24, seed=3)
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert len(dataset) == 10
    for row in dataset:
        assert row["prompt"].startswith("a solid ")
        chosen, rejected = np.asarray(row["chosen"]), np.asarray(row["rejected"])
        assert isinstance(row["chosen"], Image.Image) and row["chosen"].mode == "RGB"
        assert chosen.shape == rejected.shape == (24, 24, 3)
        assert len(np.unique(chosen.reshape(-1, 3), axis=0)) == 1
        assert rejected.std() > 50

    again = testing.make_preference_dataset(n=10, size=24, seed=3)
    assert np.array_equal(np.asarray(again[0]["rejected"]), np.asarray(dataset[0]["rejected"]))
