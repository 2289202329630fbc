"""QLoRA: the denoiser loaded quantized (bitsandbytes 4/8-bit, torchao), given in any form a user has at hand.

`model_init_kwargs["quantization_config"]` may be a diffusers `PipelineQuantizationConfig` (used as is), a single-model
config such as diffusers' `BitsAndBytesConfig` or `TorchAoConfig` (applied to the denoiser only), or a plain dict as
YAML and `--model_init_kwargs` JSON give it: the arguments of `PipelineQuantizationConfig`, with
`components_to_quantize` defaulting to the denoiser and dtype names ("bfloat16") accepted in `quant_kwargs`.
"""

import torch
from diffusers import PipelineQuantizationConfig
from diffusers.quantizers.quantization_config import QuantizationConfigMixin


def pipeline_quantization_config(value, denoiser_name: str) -> PipelineQuantizationConfig:
    """`value` as the `PipelineQuantizationConfig` that `DiffusionPipeline.from_pretrained` takes."""
    if isinstance(value, PipelineQuantizationConfig):
        return value
    if isinstance(value, QuantizationConfigMixin):
        return PipelineQuantizationConfig(quant_mapping={denoiser_name: value})
    if isinstance(value, dict):
        value = {"components_to_quantize": [denoiser_name], **value}
        value["quant_kwargs"] = {
            key: getattr(torch, v) if key.endswith("dtype") and isinstance(v, str) else v
            for key, v in (value.get("quant_kwargs") or {}).items()
        }
        return PipelineQuantizationConfig(**value)
    raise TypeError(
        "model_init_kwargs['quantization_config'] must be a diffusers PipelineQuantizationConfig, a quantization config "
        f"such as diffusers.BitsAndBytesConfig, or a dict of PipelineQuantizationConfig arguments; got "
        f"{type(value).__name__}."
    )


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether diffusers loaded this model with a quantization config (its weights are then not trainable)."""
    return bool(getattr(module, "is_quantized", False))
