"""QLoRA: LoRA on a bitsandbytes-quantized denoiser, the reference being the same quantized base with the adapter off.

diffusers refuses bitsandbytes without CUDA (`validate_environment`) and maps the weights to `cuda:N`
(`update_device_map`); bitsandbytes 0.50 itself runs 8-bit and 4-bit layers on CPU (forward and backward). The
`bnb_on_cpu` fixture bypasses exactly those two diffusers checks, so everything else runs for real here: the config
plumbing, diffusers' layer replacement and weight quantization, PEFT's bnb LoRA layers, training and saving.
"""

import math

import pytest
import torch
from diffusers import BitsAndBytesConfig, Flux2Pipeline, PipelineQuantizationConfig
from helpers import LN2, lora, losses_of, make_args
from peft import get_peft_model_state_dict
from peft.tuners.lora import bnb as lora_bnb

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.cli import parse_train_args
from diffusion_dpo_trainer.quantization import is_quantized, pipeline_quantization_config
from diffusion_dpo_trainer.testing import make_flux2_pipeline

bnb = pytest.importorskip("bitsandbytes")

EIGHT_BIT = {"quant_backend": "bitsandbytes_8bit", "quant_kwargs": {"load_in_8bit": True}}
# The tiny transformer's x_embedder (16 inputs) and context_embedder (48) are narrower than the 64-wide blocks that
# bitsandbytes' CPU 4-bit kernel needs; every other linear layer is quantized.
FOUR_BIT = {"quant_backend": "bitsandbytes_4bit",
            "quant_kwargs": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
                             "llm_int8_skip_modules": ["x_embedder", "context_embedder"]}}


@pytest.fixture(scope="module")
def flux2_dev_path(tmp_path_factory):
    return make_flux2_pipeline(tmp_path_factory.mktemp("flux2_q") / "pipe")


@pytest.fixture
def bnb_on_cpu(monkeypatch):
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    for quantizer in (bnb_quantizer.BnB8BitDiffusersQuantizer, bnb_quantizer.BnB4BitDiffusersQuantizer):
        monkeypatch.setattr(quantizer, "validate_environment", lambda self, *args, **kwargs: None)
        monkeypatch.setattr(quantizer, "update_device_map", lambda self, device_map: device_map or {"": "cpu"})


def frozen_value(weight):
    """A comparable copy of a quantized weight: torchao's tensor subclasses compare only once dequantized."""
    return weight.dequantize() if type(weight).__module__.startswith("torchao") else weight.detach().clone()


@pytest.mark.parametrize("quantization, lora_layer", [
    (EIGHT_BIT, lora_bnb.Linear8bitLt),
    (FOUR_BIT, lora_bnb.Linear4bit),
    # torchao weight-only on CPU; the config class named as text, as YAML and JSON give it.
    ({"quant_backend": "torchao", "quant_kwargs": {"quant_type": "Int8WeightOnlyConfig"}}, "TorchaoLoraLinear"),
    ({"quant_backend": "torchao", "quant_kwargs": {"quant_type": "Float8WeightOnlyConfig"}}, "TorchaoLoraLinear"),
], ids=["bnb-8bit", "bnb-4bit", "torchao-int8", "torchao-float8"])
def test_qlora_trains_an_adapter_on_the_quantized_base_which_is_also_the_reference(
        tmp_path, flux2_dev_path, pairs, bnb_on_cpu, quantization, lora_layer):
    if quantization["quant_backend"] == "torchao":
        pytest.importorskip("torchao")
        from peft.tuners.lora.torchao import TorchaoLoraLinear as lora_layer
    args = make_args(tmp_path, max_steps=3, bf16=True, use_cpu=True,
                     model_init_kwargs={"quantization_config": quantization, "torch_dtype": "bfloat16"})
    trainer = DiffusionDPOTrainer(model=flux2_dev_path, args=args, train_dataset=pairs,
                                  peft_config=lora(target_modules=None))
    transformer = trainer.family.denoiser
    assert is_quantized(transformer) and not is_quantized(trainer.family.text_encoders[0])  # the denoiser only
    to_q = transformer.transformer_blocks[0].attn.to_q
    # PEFT's LoRA layer for the quantized linear, around a weight that is not a plain parameter any more.
    assert isinstance(to_q, lora_layer) and type(to_q.base_layer.weight) is not torch.nn.Parameter
    assert trainer.ref_model is None  # no second copy: the reference is the adapter switched off
    quantized_before = frozen_value(to_q.base_layer.weight)

    # Both forwards of a step run the same quantized module: the reference first with the adapter off, then the policy
    # with it on.
    adapter_off = []
    handle = transformer.register_forward_pre_hook(lambda m, a, kw: adapter_off.append(to_q.disable_adapters),
                                                   with_kwargs=True)
    trainer.train()
    handle.remove()
    assert adapter_off == [True, False] * args.max_steps
    losses = losses_of(trainer)
    assert losses[0] == pytest.approx(LN2, abs=1e-6) and all(math.isfinite(x) for x in losses)
    assert torch.equal(frozen_value(to_q.base_layer.weight), quantized_before)  # the quantized base never changes
    lora_params = {n: p for n, p in transformer.named_parameters() if "lora" in n}
    assert lora_params and all(p.dtype == torch.float32 and p.requires_grad for p in lora_params.values())
    assert any(p.abs().sum() > 0 for n, p in lora_params.items() if "lora_B" in n)  # B starts at zero: it trained

    # The adapter loads into the ordinary (unquantized) pipeline, every trained layer of it.
    trainer.save_model()
    pipe = Flux2Pipeline.from_pretrained(flux2_dev_path)
    pipe.load_lora_weights(args.output_dir, adapter_name="dpo")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="dpo")
    trained = get_peft_model_state_dict(transformer)
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype))


def test_a_quantized_base_cannot_be_fully_fine_tuned(tmp_path, flux2_dev_path, pairs, bnb_on_cpu):
    args = make_args(tmp_path, model_init_kwargs={"quantization_config": EIGHT_BIT})
    with pytest.raises(ValueError, match=r"loaded quantized.*cannot be fully fine-tuned.*Pass a peft_config"):
        DiffusionDPOTrainer(model=flux2_dev_path, args=args, train_dataset=pairs)


def test_quantization_config_forms():
    """Python objects pass through (a single-model config applies to the denoiser); a dict (YAML / JSON) becomes a
    PipelineQuantizationConfig for the denoiser, dtype names resolved."""
    config = pipeline_quantization_config(FOUR_BIT, "transformer")
    assert config.quant_backend == "bitsandbytes_4bit" and config.components_to_quantize == ["transformer"]
    assert config.quant_kwargs["bnb_4bit_compute_dtype"] is torch.bfloat16
    both = pipeline_quantization_config({**EIGHT_BIT, "components_to_quantize": ["unet", "text_encoder"]}, "unet")
    assert both.components_to_quantize == ["unet", "text_encoder"]
    single = BitsAndBytesConfig(load_in_8bit=True)
    assert pipeline_quantization_config(single, "unet").quant_mapping == {"unet": single}
    given = PipelineQuantizationConfig(quant_mapping={"transformer": single})
    assert pipeline_quantization_config(given, "transformer") is given
    with pytest.raises(TypeError, match="quantization_config.*got str"):
        pipeline_quantization_config("nf4", "transformer")


def test_torchao_is_mapped_per_component_with_its_library_config():
    torchao = pytest.importorskip("torchao.quantization")
    import diffusers
    import transformers

    config = pipeline_quantization_config(
        {"quant_backend": "torchao", "quant_kwargs": {"quant_type": "Int8WeightOnlyConfig"},
         "components_to_quantize": ["transformer", "text_encoder"]}, "transformer")
    assert type(config.quant_mapping["transformer"]) is diffusers.TorchAoConfig
    assert type(config.quant_mapping["text_encoder"]) is transformers.TorchAoConfig
    assert isinstance(config.quant_mapping["transformer"].quant_type, torchao.Int8WeightOnlyConfig)
    with pytest.raises(ValueError, match="'Int3Config' is not a torchao.quantization config class"):
        pipeline_quantization_config({"quant_backend": "torchao", "quant_kwargs": {"quant_type": "Int3Config"}}, "unet")


def test_the_command_line_takes_a_quantization_config_as_json(tmp_path):
    _, args = parse_train_args([
        "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path),
        "--model_init_kwargs", '{"torch_dtype": "bfloat16", "quantization_config": {"quant_backend": '
        '"bitsandbytes_4bit", "quant_kwargs": {"load_in_4bit": true, "bnb_4bit_compute_dtype": "bfloat16"}}}',
    ])
    config = pipeline_quantization_config(args.model_init_kwargs["quantization_config"], "transformer")
    assert config.quant_backend == "bitsandbytes_4bit" and config.quant_kwargs["load_in_4bit"] is True
    assert config.quant_kwargs["bnb_4bit_compute_dtype"] is torch.bfloat16


def test_a_quantized_text_encoder_encodes_the_cache_uncast(tmp_path, flux2_dev_path, pairs, bnb_on_cpu):
    """`components_to_quantize` may include the text encoder (the 24B Mistral of FLUX.2 [dev] is ~13 GB in 4-bit):
    the trainer moves it for the cache without casting it, and training runs from the cached embeddings."""
    quantization = {**EIGHT_BIT, "components_to_quantize": ["transformer", "text_encoder"]}
    args = make_args(tmp_path, max_steps=1, bf16=True, use_cpu=True, precompute_text_embeddings=True,
                     model_init_kwargs={"quantization_config": quantization, "torch_dtype": "bfloat16"})
    trainer = DiffusionDPOTrainer(model=flux2_dev_path, args=args, train_dataset=pairs,
                                  peft_config=lora(target_modules=None))
    encoder = trainer.family.text_encoders[0]
    assert is_quantized(encoder) and is_quantized(trainer.family.denoiser)
    assert len(trainer.data_collator.prompt_embeddings) == len(set(pairs["prompt"]))
    trainer.train()
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
