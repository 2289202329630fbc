"""QLoRA: the denoiser loaded quantized (bitsandbytes 4/8-bit, torchao), given in any form a user has at hand.

`model_init_kwargs["quantization_config"]` may be a diffusers `PipelineQuantizationConfig` (used as is), a single-model
config such as diffusers' `BitsAndBytesConfig` or `TorchAoConfig` (applied to the denoiser only), or a plain dict as
YAML and `--model_init_kwargs` JSON give it: the arguments of `PipelineQuantizationConfig`, with
`components_to_quantize` defaulting to the denoiser and dtype names ("bfloat16") accepted in `quant_kwargs`; for
`quant_backend: torchao`, `quant_type` may name a torchao config class ("Int8WeightOnlyConfig").
"""

import torch
from diffusers import PipelineQuantizationConfig
from diffusers.quantizers.quantization_config import QuantizationConfigMixin


def pipeline_quantization_config(value, denoiser_name: str | None) -> PipelineQuantizationConfig:
    """`value` as the `PipelineQuantizationConfig` that `DiffusionPipeline.from_pretrained` takes. `denoiser_name` is
    None for a pipeline class no family trains (sampling only): then the components must be named."""
    if isinstance(value, PipelineQuantizationConfig):
        return value
    if denoiser_name is None and not (isinstance(value, dict) and value.get("components_to_quantize")):
        raise ValueError("This pipeline class has no family to say which component is the denoiser: pass a "
                         "PipelineQuantizationConfig, or a dict with components_to_quantize.")
    if isinstance(value, QuantizationConfigMixin):
        return PipelineQuantizationConfig(quant_mapping={denoiser_name: value})
    if isinstance(value, dict):
        value = {"components_to_quantize": [denoiser_name], **value}
        kwargs = {
            key: getattr(torch, v) if key.endswith("dtype") and isinstance(v, str) else v
            for key, v in (value.get("quant_kwargs") or {}).items()
        }
        if value.get("quant_backend") == "torchao":
            return _torchao_mapping(value["components_to_quantize"], kwargs)
        return PipelineQuantizationConfig(**{**value, "quant_kwargs": kwargs})
    raise TypeError(
        "model_init_kwargs['quantization_config'] must be a diffusers PipelineQuantizationConfig, a quantization config "
        f"such as diffusers.BitsAndBytesConfig, or a dict of PipelineQuantizationConfig arguments; got "
        f"{type(value).__name__}."
    )


def _torchao_mapping(components: list[str], kwargs: dict) -> PipelineQuantizationConfig:
    """torchao per component: diffusers' and transformers' `TorchAoConfig` differ, so a backend-wide
    `PipelineQuantizationConfig` refuses it. `quant_type` may name a `torchao.quantization` config class."""
    try:
        import torchao.quantization
    except ImportError as exc:
        raise ImportError("quant_backend 'torchao' needs torchao: pip install 'diffusion-dpo-trainer[torchao]'.") from exc
    from diffusers import TorchAoConfig
    from transformers import TorchAoConfig as TransformersTorchAoConfig

    if isinstance(kwargs.get("quant_type"), str):
        config_class = getattr(torchao.quantization, kwargs["quant_type"], None)
        if not isinstance(config_class, type):
            raise ValueError(f"quant_type {kwargs['quant_type']!r} is not a torchao.quantization config class "
                             "(e.g. Int8WeightOnlyConfig, Float8WeightOnlyConfig).")
        kwargs = {**kwargs, "quant_type": config_class()}
    return PipelineQuantizationConfig(quant_mapping={
        name: (TransformersTorchAoConfig if name.startswith("text_encoder") else TorchAoConfig)(**kwargs)
        for name in components
    })


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether diffusers loaded this model with a quantization config (its weights are then not trainable)."""
    return bool(getattr(module, "is_quantized", False))
