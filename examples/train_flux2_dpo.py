"""Diffusion-DPO LoRA for FLUX.2 [klein] (one 24 GB GPU) or FLUX.2 [dev] (QLoRA, one 48 GB GPU) on Pick-a-Pic v2.

    accelerate launch examples/train_flux2_dpo.py --variant klein --output_dir flux2-klein-dpo-lora
    accelerate launch examples/train_flux2_dpo.py --variant dev --output_dir flux2-dev-dpo-lora

Every `DiffusionDPOConfig` / `TrainingArguments` field is a flag too (`--help` lists them); the defaults below are the
recipe of the chosen variant (`--dry_run` prints it as JSON and exits without loading anything). The full Pick-a-Pic
v2 train split is a very large download: `--max_train_samples` trains on its first rows. FLUX.2 [dev] is gated (accept
its license on the Hub and log in first); FLUX.2 [klein] base 4B is Apache-2.0. Load the result with:

    pipe = Flux2KleinPipeline.from_pretrained("black-forest-labs/FLUX.2-klein-base-4B", torch_dtype=torch.bfloat16)
    pipe.load_lora_weights("flux2-klein-dpo-lora")

Memory (docs/models.md has the arithmetic): [klein] base 4B trains a bf16 LoRA with its 4B transformer and its Qwen3-4B
text encoder (8 GB each) on the GPU. [dev] quantizes its 32B transformer and its 24B Mistral text encoder to 4-bit
(~17 GB + ~13 GB; bitsandbytes loads both onto the GPU), the LoRA adapter stays in float32. With a small dataset,
`--precompute_text_embeddings True --release_cached_encoders True` encodes every prompt once and then frees the text
encoder (its cache takes 512 x 3 x hidden x 4 bytes per distinct prompt: ~16 MB for [klein] 4B, ~31 MB for [dev]).
"""

import argparse
import json
from dataclasses import asdict, dataclass, field

from datasets import load_dataset
from peft import LoraConfig
from transformers import HfArgumentParser

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer

MODELS = {"klein": "black-forest-labs/FLUX.2-klein-base-4B", "dev": "black-forest-labs/FLUX.2-dev"}

RECIPE = dict(
    # FLUX.2's default (1000, as FLUX.1): flow-matching errors are larger than SD's epsilon errors.
    beta=1000.0,
    weighting_scheme="logit_normal",
    resolution=1024,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=16,  # x the number of GPUs: an effective batch of 64+ pairs is a good start
    learning_rate=1e-5,
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=100,
    max_steps=2000,
    optim="adamw_bnb_8bit",
    gradient_checkpointing=True,
    bf16=True,
    logging_steps=10,
    save_steps=250,
    dataloader_num_workers=4,
)
VARIANTS = {
    "klein": dict(output_dir="flux2-klein-dpo-lora", model_init_kwargs={"torch_dtype": "bfloat16"}),
    "dev": dict(
        output_dir="flux2-dev-dpo-lora",
        # [dev] is guidance-distilled: trained at the guidance it is sampled with (Flux2Pipeline's default 4.0).
        guidance_scale=4.0,
        model_init_kwargs={
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_backend": "bitsandbytes_4bit",
                "quant_kwargs": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                 "bnb_4bit_compute_dtype": "bfloat16"},
                "components_to_quantize": ["transformer", "text_encoder"],
            },
        },
    ),
}


@dataclass
class ScriptArguments:
    variant: str = field(default="klein", metadata={"help": "klein (24 GB GPU) or dev (48 GB GPU, QLoRA).",
                                                    "choices": sorted(MODELS)})
    model: str | None = field(default=None, metadata={"help": "Base model (or a local path); default: the variant's."})
    dataset: str = field(default="yuvalkirstain/pickapic_v2", metadata={"help": "A Pick-a-Pic layout dataset."})
    dataset_split: str = field(default="train")
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    rank: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (defaults to the rank)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LoRA target modules; default: the family's (both attention streams of the double blocks, "
                  "the single blocks' fused input and output projections)."},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Print the resolved recipe (these options with the model id, the training config and the "
                  "LoRA config) as JSON and exit, without loading the model or the data."},
    )


def parse_args(argv=None) -> tuple[ScriptArguments, DiffusionDPOConfig]:
    variant = argparse.ArgumentParser(add_help=False)
    variant.add_argument("--variant", default="klein", choices=sorted(MODELS))
    known, _ = variant.parse_known_args(argv)
    parser = HfArgumentParser((ScriptArguments, DiffusionDPOConfig))
    parser.set_defaults(**RECIPE, **VARIANTS[known.variant])
    return parser.parse_args_into_dataclasses(args=argv)


def model_id(options: ScriptArguments) -> str:
    return options.model or MODELS[options.variant]


def make_lora_config(options: ScriptArguments) -> LoraConfig:
    return LoraConfig(r=options.rank, lora_alpha=options.lora_alpha or options.rank, init_lora_weights="gaussian",
                      target_modules=options.target_modules)


def load_train_dataset(options: ScriptArguments):
    """The raw Pick-a-Pic rows: the trainer detects the layout, drops ties (label_0 == 0.5) and makes the pairs."""
    dataset = load_dataset(options.dataset, split=options.dataset_split)
    if options.max_train_samples is not None:
        dataset = dataset.select(range(min(options.max_train_samples, len(dataset))))
    return dataset


def main(argv=None):
    options, config = parse_args(argv)
    if options.dry_run:
        lora_config = make_lora_config(options)
        targets = lora_config.target_modules
        print(json.dumps({"options": {**asdict(options), "model_id": model_id(options)},
                          "config": json.loads(config.to_json_string()),
                          "lora": {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha,
                                   "target_modules": None if targets is None else sorted(targets)}}))
        return
    trainer = DiffusionDPOTrainer(model=model_id(options), args=config, train_dataset=load_train_dataset(options),
                                  peft_config=make_lora_config(options))
    trainer.train()
    trainer.save_model()
    if config.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
