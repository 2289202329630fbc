"""One rank of the 2-process run in test_hacking.py (launched with torch.distributed.run): offline DPO with a
`RewardHackingCallback(stop_on_hacking=True)` whose scripted rewards raise the alarm at step 2 on the main process.
Writes the step each rank stopped at to <report_dir>/hacking-rank<N>.json."""

import json
import os
import sys

import torch
from peft import LoraConfig

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer, RewardHackingCallback
from diffusion_dpo_trainer.testing import make_preference_dataset


def run(pipeline_path: str, output_dir: str, report_dir: str) -> None:
    args = DiffusionDPOConfig(output_dir=output_dir, resolution=32, per_device_train_batch_size=1, max_steps=4,
                              beta=5000, learning_rate=1e-3, save_strategy="no", report_to="none", seed=0,
                              use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    trainer = DiffusionDPOTrainer(model=pipeline_path, args=args, train_dataset=make_preference_dataset(n=8, size=32),
                                  peft_config=lora)

    def scripted(sign):
        return lambda images, prompts: [sign * float(trainer.state.global_step)] * len(images)

    trainer.add_callback(RewardHackingCallback(trainer, ["a red square"], reward_fn=scripted(1),
                                               heldout_reward_fn=scripted(-1), seeds=[0, 1], eval_steps=2,
                                               stop_on_hacking=True, num_inference_steps=2, height=32, width=32))
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(report_dir, f"hacking-rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "step": trainer.state.global_step}, f)
    # Leave the group before the interpreter exits: gloo's threads torn down at exit can abort a rank (SIGABRT,
    # "terminate called without an active exception"), seen once in CI after the early stop.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(*sys.argv[1:4])
