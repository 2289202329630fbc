"""One rank of the 2-process DiffusionNFT run in test_nft.py (launched with torch.distributed.run), or the
single-process run with the same global batch (`--single`). Writes the log history, the policy's and the old policy's
LoRA weights and the seeds each rank sampled to <report_dir>/nft-rank<N>[-single].json."""

import json
import os
import sys

import numpy as np
from datasets import Dataset
from peft import LoraConfig

from diffusion_dpo_trainer import DiffusionNFTConfig, DiffusionNFTTrainer

GLOBAL_PROMPTS = 4
PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun", "a cat", "a dog", "a boat", "a car"]


def brightness(prompts, completions, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in completions]


def run(pipeline_path: str, output_dir: str, report_dir: str, single: bool = False) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = DiffusionNFTConfig(
        output_dir=output_dir, resolution=32, per_device_train_batch_size=GLOBAL_PROMPTS // world, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
        dataloader_pin_memory=False, disable_tqdm=True, num_generations=2, num_inference_steps=2, num_iterations=2,
        scale_rewards="group", ema_decay_type=2, ema_flat=1, beta=1e-2,
    )
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    trainer = DiffusionNFTTrainer(model=pipeline_path, reward_funcs=brightness, args=args, peft_config=lora,
                                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    sampled = []
    sample = trainer._sample

    def recording(prompts, seeds):
        sampled.append(list(seeds))
        return sample(prompts, seeds)

    trainer._sample = recording
    trainer.train()
    rank = trainer.accelerator.process_index
    state = trainer.family.denoiser.state_dict()
    report = {"world": trainer.accelerator.num_processes, "log_history": trainer.state.log_history, "sampled": sampled,
              **{adapter: {k: v.tolist() for k, v in state.items() if f".{adapter}." in k}
                 for adapter in ("default", "old")}}
    with open(os.path.join(report_dir, f"nft-rank{rank}{'-single' if single else ''}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    run(*sys.argv[1:4])
