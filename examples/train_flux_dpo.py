"""Diffusion-DPO LoRA for FLUX.1-dev on Pick-a-Pic v2, with the recommended flow-matching settings.

    accelerate launch examples/train_flux_dpo.py --output_dir flux-dpo-lora

Every `DiffusionDPOConfig` / `TrainingArguments` field is a flag too (`--help` lists them); the defaults below are the
recipe. Pick-a-Pic v2 (hundreds of GB) is streamed, so training starts without downloading it first;
`--dataset_streaming False` downloads and stores it instead (for several epochs, or to cache latents and embeddings
with `--precompute_latents True --precompute_text_embeddings True`). `--max_train_samples` trains on its first rows.
Local files in the same layout: `--dataset json --data_files pairs.jsonl` (or parquet, csv). `--dry_run` prints the
resolved recipe as JSON (with `--data_files`, also the first training rows) and exits without loading the model.
FLUX.1-dev is a gated model: accept its license on the Hub and log in first. Load the result with:

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    pipe.load_lora_weights("flux-dpo-lora")
"""

import itertools
import json
from dataclasses import asdict, dataclass, field

from datasets import load_dataset
from peft import LoraConfig
from transformers import HfArgumentParser

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer

# Attention projections of both streams of the joint attention (the trainer's default for FLUX). diffusers' FLUX LoRA
# script also adds the feed-forwards: "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2".
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

RECIPE = dict(
    output_dir="flux-dpo-lora",
    # FLUX's default (1000): flow-matching errors are larger than SD's epsilon errors, see docs/flow-models.md.
    beta=1000.0,
    weighting_scheme="logit_normal",
    # FLUX.1-dev is guidance-distilled: it is trained at the guidance it will be sampled with (FluxPipeline's 3.5).
    guidance_scale=3.5,
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
    model_init_kwargs={"torch_dtype": "bfloat16"},  # the frozen 12B transformer and the T5 encoder in bf16
    logging_steps=10,
    save_steps=250,
    dataloader_num_workers=4,
)


@dataclass
class ScriptArguments:
    model: str = field(default="black-forest-labs/FLUX.1-dev", metadata={"help": "Base model (or a local path)."})
    dataset: str = field(default="yuvalkirstain/pickapic_v2", metadata={"help": "A Pick-a-Pic layout dataset."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Local files of a file-format --dataset (json, parquet, csv)."}
    )
    dataset_split: str = field(default="train")
    dataset_streaming: bool = field(
        default=True, metadata={"help": "Stream the dataset instead of downloading it first (needs max_steps)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    rank: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (defaults to the rank)."})
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    dry_run: bool = field(
        default=False,
        metadata={"help": "Print the resolved recipe (these options, the training config and the LoRA config) as "
                  "JSON and exit, without loading the model; with --data_files, also the first training rows."},
    )
    no_lora: bool = field(
        default=False,
        metadata={"help": "Full fine-tune instead of LoRA (far more memory; pass --model_init_kwargs '{}' to keep "
                  "float32 master weights)."},
    )


def parse_args(argv=None) -> tuple[ScriptArguments, DiffusionDPOConfig]:
    parser = HfArgumentParser((ScriptArguments, DiffusionDPOConfig))
    parser.set_defaults(**RECIPE)
    return parser.parse_args_into_dataclasses(args=argv)


def make_lora_config(options: ScriptArguments) -> LoraConfig | None:
    if options.no_lora:
        return None
    return LoraConfig(r=options.rank, lora_alpha=options.lora_alpha or options.rank, init_lora_weights="gaussian",
                      target_modules=options.target_modules)


def load_train_dataset(options: ScriptArguments):
    """The raw Pick-a-Pic rows: the trainer detects the layout, drops ties (label_0 == 0.5) and makes the pairs."""
    dataset = load_dataset(options.dataset, data_files=options.data_files, split=options.dataset_split,
                           streaming=options.dataset_streaming)
    if options.max_train_samples is not None:
        if options.dataset_streaming:
            return dataset.take(options.max_train_samples)
        dataset = dataset.select(range(min(options.max_train_samples, len(dataset))))
    return dataset


def main(argv=None):
    options, config = parse_args(argv)
    if options.dry_run:
        lora_config = make_lora_config(options)
        recipe = {"options": asdict(options), "config": json.loads(config.to_json_string()),
                  "lora": None if lora_config is None else {
                      "r": lora_config.r, "lora_alpha": lora_config.lora_alpha,
                      "target_modules": sorted(lora_config.target_modules)}}
        if options.data_files:  # local files are cheap to read: show what training would get
            dataset = load_train_dataset(options)
            recipe["dataset"] = {"type": type(dataset).__name__, "first_rows": list(itertools.islice(dataset, 10))}
        print(json.dumps(recipe, default=str))
        return
    trainer = DiffusionDPOTrainer(model=options.model, args=config, train_dataset=load_train_dataset(options),
                                  peft_config=make_lora_config(options))
    trainer.train()
    trainer.save_model()
    if config.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
