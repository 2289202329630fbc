"""One rank of the 2-process GRPO run in test_grpo.py (launched with torch.distributed.run), or the single-process run
with the same global batch (`--single`). Writes the log history and the LoRA weights to
<report_dir>/grpo-rank<N>[-single].json."""

import json
import os
import sys

import numpy as np
from datasets import Dataset
from peft import LoraConfig

from diffusion_dpo_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer

GLOBAL_PROMPTS = 2
PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun"]


def brightness(prompts, completions, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in completions]


def run(pipeline_path: str, output_dir: str, report_dir: str, single: bool = False) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # scale_rewards="batch": the advantages divide by the std of the GLOBAL batch, so a per-process std would show.
    args = DiffusionGRPOConfig(
        output_dir=output_dir, resolution=32, per_device_train_batch_size=GLOBAL_PROMPTS // world, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
        dataloader_pin_memory=False, disable_tqdm=True, num_generations=2, num_inference_steps=2, guidance_scale=2.0,
        num_iterations=2, beta=0.04, epsilon=0.2, scale_rewards="batch", timestep_fraction=1.0,
    )
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    trainer = DiffusionGRPOTrainer(model=pipeline_path, reward_funcs=brightness, args=args, peft_config=lora,
                                   train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    rank = trainer.accelerator.process_index
    report = {"world": trainer.accelerator.num_processes, "log_history": trainer.state.log_history,
              "lora": {k: v.tolist() for k, v in trainer.model.state_dict().items() if "lora" in k}}
    with open(os.path.join(report_dir, f"grpo-rank{rank}{'-single' if single else ''}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    run(*sys.argv[1:4])
