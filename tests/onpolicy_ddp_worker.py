"""One rank of the 2-process run of an on-policy trainer (online DPO, GRPO or DiffusionNFT) in test_online.py,
test_grpo.py and test_nft.py (launched with torch.distributed.run), or the single-process run with the same global
batch (`single=True`). Writes the log history, the LoRA adapters' weights and what each rank sampled (prompts and
seeds, for the trainers that sample through `_sample`) to <report_dir>/<method>-rank<N>[-single].json."""

import json
import os
import sys

import numpy as np
from datasets import Dataset
from peft import LoraConfig

from diffusion_dpo_trainer import (
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    DiffusionOnlineDPOConfig,
    DiffusionOnlineDPOTrainer,
)

BETA = 100  # online DPO: a small beta keeps float noise in the errors from dominating the logged rewards
PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun", "a cat", "a dog", "a boat", "a car"]
# method -> (config, trainer, prompts per global batch, the method's own settings, adapters to report)
METHODS = {
    "online": (DiffusionOnlineDPOConfig, DiffusionOnlineDPOTrainer, 4,
               dict(beta=BETA, num_images_per_prompt=2, guidance_scale=1.0), ("default",)),
    # scale_rewards="batch": the advantages divide by the std of the GLOBAL batch, so a per-process std would show.
    "grpo": (DiffusionGRPOConfig, DiffusionGRPOTrainer, 2,
             dict(num_generations=2, guidance_scale=2.0, beta=0.04, epsilon=0.2, scale_rewards="batch",
                  timestep_fraction=1.0), ("default",)),
    "nft": (DiffusionNFTConfig, DiffusionNFTTrainer, 4,
            dict(num_generations=2, scale_rewards="group", ema_decay_type=2, ema_flat=1, beta=1e-2),
            ("default", "old")),
}


def brightness(prompts, completions, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in completions]


def run(method: str, pipeline_path: str, output_dir: str, report_dir: str, single: bool = False) -> None:
    config_class, trainer_class, global_prompts, settings, adapters = METHODS[method]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = config_class(
        output_dir=output_dir, resolution=32, per_device_train_batch_size=global_prompts // world, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
        dataloader_pin_memory=False, disable_tqdm=True, num_inference_steps=2, num_iterations=2, **settings,
    )
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    trainer = trainer_class(model=pipeline_path, reward_funcs=brightness, args=args, peft_config=lora,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS[: 2 * global_prompts]}))
    sampled = []
    if hasattr(trainer, "_sample"):
        sample = trainer._sample

        def recording(prompts, seeds, conditioning):
            sampled.append({"prompts": list(prompts), "seeds": list(seeds)})
            return sample(prompts, seeds, conditioning)

        trainer._sample = recording
    trainer.train()
    state = trainer.family.denoiser.state_dict()
    report = {"world": trainer.accelerator.num_processes, "log_history": trainer.state.log_history, "sampled": sampled,
              **{adapter: {k: v.tolist() for k, v in state.items() if f".{adapter}." in k} for adapter in adapters}}
    rank = trainer.accelerator.process_index
    with open(os.path.join(report_dir, f"{method}-rank{rank}{'-single' if single else ''}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    run(*sys.argv[1:5])
