"""GRPO's rollout against the pipeline's own sampling, and what the window (MixGRPO) saves in training.

1. Sampling, interleaved round by round in one run so a busy machine slows all alike, same prompts, seeds, steps,
   batch and guidance: the pipeline's own deterministic sampler (`rollout` with the default step: the pipeline
   untouched), and the GRPO rollout (the stochastic step with its log-density: DDIM with eta for SD, Flow-SDE for SD3,
   every step recorded). Medians; `ratio = rollout / pipeline` (target <= 1.05).
2. Training: one `DiffusionGRPOTrainer` optimizer step trains every step but the last (timestep_fraction 0.99) or only
   a window of `--window` steps: medians of the logged `time/training`, and the ratio.

    PYTHONPATH=. python benchmarks/bench_rollout.py --model tiny-sd3 --steps 10 --batch 8 --rounds 5
    PYTHONPATH=. python benchmarks/bench_rollout.py --model sd15 --resolution 512 --steps 10 --batch 8   # on a GPU

`--model sd15` is the full-size SD1.5 UNet with random weights (bench_step.py's builder, nothing downloaded).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusion_dpo_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_dpo_trainer.rollout import rollout
from diffusion_dpo_trainer.testing import make_sd3_pipeline, make_sd_pipeline

PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun"]


def load_model(model: str, workdir: str, device: str):
    """A path (tiny pipelines) or a pipeline object (sd15): what `DiffusionGRPOTrainer(model=...)` takes."""
    if model == "tiny-sd3":
        return make_sd3_pipeline(os.path.join(workdir, "sd3")) if not os.path.exists(os.path.join(workdir, "sd3")) \
            else os.path.join(workdir, "sd3")
    if model == "tiny-sd":
        return make_sd_pipeline(os.path.join(workdir, "sd")) if not os.path.exists(os.path.join(workdir, "sd")) \
            else os.path.join(workdir, "sd")
    from bench_step import build_pipeline

    return build_pipeline("sd15", workdir, torch.float16 if device == "cuda" else torch.float32).to(device)


def brightness(prompts, completions, **kwargs):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in completions]


def trainer_for(model, opts, workdir: str, **overrides) -> DiffusionGRPOTrainer:
    values = {"output_dir": os.path.join(workdir, "out"), "resolution": opts.resolution, "max_steps": opts.train_steps,
              "per_device_train_batch_size": max(opts.batch // 2, 1), "num_generations": 2, "learning_rate": 1e-4,
              "logging_steps": 1, "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
              "num_inference_steps": opts.steps, "guidance_scale": opts.guidance, "beta": 0.0,
              "dataloader_pin_memory": False, "use_cpu": opts.device == "cpu", "fp16": opts.device == "cuda"}
    values.update(overrides)
    return DiffusionGRPOTrainer(model=model, reward_funcs=brightness, args=DiffusionGRPOConfig(**values),
                                train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                                peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]))


def sampling(trainer, opts) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(opts.batch)]
    call = {"num_inference_steps": opts.steps, "guidance_scale": opts.guidance, "decode": False}
    variants = {"pipeline": lambda: rollout(trainer.family, prompts, seeds, opts.resolution, **call),
                "rollout_with_log_prob": lambda: rollout(trainer.family, prompts, seeds, opts.resolution,
                                                         step=trainer._sampler_step(None), record=True, **call)}
    times = {name: [] for name in variants}
    # CPU time of this process: on a shared CPU, what the work costs whatever else runs (one thread: OMP_NUM_THREADS=1)
    clock = time.process_time if opts.clock == "cpu" else time.perf_counter
    for r in range(opts.warmup + opts.rounds):
        seeds = list(range(r * opts.batch, (r + 1) * opts.batch))
        for name, fn in variants.items():
            if opts.device == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if opts.device == "cuda":
                torch.cuda.synchronize()
            if r >= opts.warmup:
                times[name].append(clock() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"median_s": medians, "ratio": medians["rollout_with_log_prob"] / medians["pipeline"]}


def training(model_for, opts, workdir: str) -> dict:
    result = {}
    for name, overrides in (("every_step", {"timestep_fraction": 0.99}),
                            (f"window_{opts.window}", {"sde_window_size": opts.window})):
        trainer = trainer_for(model_for(), opts, workdir, **overrides)
        trainer.train()
        logged = [h["time/training"] for h in trainer.state.log_history if "time/training" in h]
        result[name] = {"trained_steps": len(trainer.trained_steps(0)), "median_training_s": statistics.median(logged)}
    names = list(result)
    result["window_over_every_step"] = result[names[1]]["median_training_s"] / result[names[0]]["median_training_s"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny-sd3", "tiny-sd", "sd15"), default="tiny-sd3")
    parser.add_argument("--resolution", type=int, default=None, help="default: 32 for tiny models, 512 for sd15")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--batch", type=int, default=8, help="images per rollout (one pipeline call)")
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--window", type=int, default=2, help="window size for the training comparison")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="sampling times as wall-clock or as this process's CPU time (a shared CPU)")
    parser.add_argument("--no-training", action="store_true", help="measure the sampling only")
    parser.add_argument("--json", default=None, help="also write the result here")
    opts = parser.parse_args(argv)
    opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    opts.resolution = opts.resolution or (512 if opts.model == "sd15" else 32)
    with tempfile.TemporaryDirectory() as workdir:
        def model_for():
            return load_model(opts.model, workdir, opts.device)

        result = {"model": opts.model, "device": opts.device, "clock": opts.clock, "resolution": opts.resolution, "steps": opts.steps,
                  "batch": opts.batch, "guidance": opts.guidance, "torch_threads": torch.get_num_threads(),
                  "sampling": sampling(trainer_for(model_for(), opts, workdir), opts)}
        if not opts.no_training:
            result["training"] = training(model_for, opts, workdir)
    print(json.dumps(result, indent=2))
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
