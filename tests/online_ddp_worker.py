"""One rank of the 2-process online DPO run in test_online.py (launched with torch.distributed.run), or the
single-process run with the same global batch (`--single`). Writes the log history, the LoRA weights and the prompts
each rank sampled to <report_dir>/online-rank<N>[-single].json."""

import json
import os
import sys

import numpy as np
from datasets import Dataset
from peft import LoraConfig

from diffusion_dpo_trainer import DiffusionOnlineDPOConfig, DiffusionOnlineDPOTrainer

GLOBAL_PROMPTS = 4
BETA = 100  # a small beta keeps float noise in the errors from dominating the logged rewards
PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun", "a cat", "a dog", "a boat", "a car"]


def brightness(prompts, completions, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in completions]


def run(pipeline_path: str, output_dir: str, report_dir: str, single: bool = False) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = DiffusionOnlineDPOConfig(
        output_dir=output_dir, resolution=32, per_device_train_batch_size=GLOBAL_PROMPTS // world, max_steps=3,
        beta=BETA, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
        dataloader_pin_memory=False, disable_tqdm=True, num_images_per_prompt=2, num_inference_steps=2,
        guidance_scale=1.0, num_iterations=2,
    )
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    trainer = DiffusionOnlineDPOTrainer(model=pipeline_path, reward_funcs=brightness, args=args, peft_config=lora,
                                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    sampled = []
    sample = trainer._sample

    def recording(prompts, seeds):
        sampled.append({"prompts": list(prompts), "seeds": list(seeds)})
        return sample(prompts, seeds)

    trainer._sample = recording
    trainer.train()
    rank = trainer.accelerator.process_index
    report = {"world": trainer.accelerator.num_processes, "log_history": trainer.state.log_history, "sampled": sampled,
              "lora": {k: v.tolist() for k, v in trainer.model.state_dict().items() if "lora" in k}}
    with open(os.path.join(report_dir, f"online-rank{rank}{'-single' if single else ''}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    run(*sys.argv[1:4])
