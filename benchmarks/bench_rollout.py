"""GRPO's rollout against the pipeline's own sampling, and what the window (MixGRPO) saves in training.

1. Sampling, interleaved round by round in one run (the order rotated every round) so a busy machine slows all
   alike; same prompts, seeds, steps, batch and guidance: the pipeline's own deterministic sampler (`rollout` with the
   default step: the pipeline untouched), and the GRPO rollout's stochastic step with its log-density (DDIM with eta
   for SD, Flow-SDE for SD3), once without recording and once with every step recorded (what GRPO runs). Each
   round's ratio to the pipeline's time in the same round; the medians of those paired ratios (target <= 1.05).
2. Training: `DiffusionGRPOTrainer` runs of `--train-steps` optimizer steps training every step but the last
   (timestep_fraction 0.99) or only a window of `--window` steps (sde_window_size), alternated for `--train-rounds`
   rounds: per run the median logged `time/training` (one optimizer step: a forward and backward per trained step),
   the seconds per trained step, and the median paired ratio window / every step.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py --model tiny-sd3 tiny-sd --clock cpu --rounds 15
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py --model tiny-sd3 tiny-sd --width 8 --clock cpu
    PYTHONPATH=. python benchmarks/bench_rollout.py --model sd15 --resolution 512 --steps 10 --batch 8   # on a GPU

`--width K` widens the tiny denoiser K times (SD3: attention heads; SD: UNet channels; random weights), so that the
denoiser takes a realistic share of a step; `--model sd15` is the full-size SD1.5 UNet with random weights
(bench_step.py's builder, nothing downloaded).
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
from diffusers import DiffusionPipeline, SD3Transformer2DModel, UNet2DConditionModel
from peft import LoraConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusion_dpo_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_dpo_trainer.rollout import rollout
from diffusion_dpo_trainer.testing import make_sd3_pipeline, make_sd_pipeline

PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun"]


def load_model(model: str, workdir: str, device: str, width: int = 1):
    """A path (tiny pipelines, `width` times wider denoiser) or a pipeline object (sd15): what
    `DiffusionGRPOTrainer(model=...)` takes."""
    if model in ("tiny-sd3", "tiny-sd"):
        path = os.path.join(workdir, f"{model}-x{width}")
        if not os.path.exists(path):
            (make_sd3_pipeline if model == "tiny-sd3" else make_sd_pipeline)(path)
            if width > 1:
                widen(path, width)
        return path
    from bench_step import build_pipeline

    return build_pipeline("sd15", workdir, torch.float16 if device == "cuda" else torch.float32).to(device)


def widen(path: str, width: int) -> None:
    """Replace the saved tiny pipeline's denoiser by one `width` times wider (random weights, seeded)."""
    pipeline = DiffusionPipeline.from_pretrained(path)
    torch.manual_seed(0)
    if hasattr(pipeline, "transformer"):
        config = dict(pipeline.transformer.config)
        heads = config["num_attention_heads"] * width
        config.update(num_attention_heads=heads, caption_projection_dim=heads * config["attention_head_dim"])
        pipeline.transformer = SD3Transformer2DModel.from_config(config)
    else:
        config = dict(pipeline.unet.config)
        config["block_out_channels"] = [c * width for c in config["block_out_channels"]]
        pipeline.unet = UNet2DConditionModel.from_config(config)
    pipeline.save_pretrained(path, safe_serialization=True)


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


def timed(fn, clock, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = clock()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def summary(times: list[float], ratios: list[float] | None = None) -> dict:
    result = {"median_s": statistics.median(times), "times_s": times}
    if ratios is not None:
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        result.update(ratio_median=statistics.median(ratios), ratio_quartiles=[quartiles[0], quartiles[2]],
                      ratios=ratios)
    return result


def sampling(trainer, opts) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(opts.batch)]
    call = {"num_inference_steps": opts.steps, "guidance_scale": opts.guidance, "decode": False}

    def variant(step: bool, record: bool):
        kwargs = {"step": trainer._sampler_step(None), "record": record} if step else {}
        return lambda seeds: rollout(trainer.family, prompts, seeds, opts.resolution, **call, **kwargs)

    variants = {"pipeline": variant(False, False), "step_with_log_prob": variant(True, False),
                "step_with_log_prob_recorded": variant(True, True)}
    names = list(variants)
    times = {name: [] for name in names}
    # CPU time of this process: on a shared CPU, what the work costs whatever else runs (one thread: OMP_NUM_THREADS=1)
    clock = time.process_time if opts.clock == "cpu" else time.perf_counter
    for r in range(opts.warmup + opts.rounds):
        seeds = list(range(r * opts.batch, (r + 1) * opts.batch))
        order = names[r % len(names):] + names[: r % len(names)]  # no variant always runs first (or after another)
        measured = {name: timed(lambda: variants[name](seeds), clock, opts.device) for name in order}
        if r >= opts.warmup:
            for name in names:
                times[name].append(measured[name])
    pipeline = times["pipeline"]
    return {name: summary(t, None if name == "pipeline" else [a / b for a, b in zip(t, pipeline)])
            for name, t in times.items()}


def training(model_for, opts, workdir: str) -> dict:
    """Alternating runs, every step trained (timestep_fraction 0.99) against a window; the first optimizer step of each
    run is its warm-up."""
    settings = {"every_step": {"timestep_fraction": 0.99}, f"window_{opts.window}": {"sde_window_size": opts.window}}
    runs = {name: [] for name in settings}
    trained = {}
    for _ in range(opts.train_rounds):
        for name, overrides in settings.items():
            trainer = trainer_for(model_for(), opts, workdir, **overrides)
            trainer.train()
            logged = [h["time/training"] for h in trainer.state.log_history if "time/training" in h]
            runs[name].append(statistics.median(logged[1:] or logged))
            trained[name] = len(trainer.trained_steps(0))
    result = {name: {"trained_steps": trained[name], **summary(runs[name]),
                     "seconds_per_trained_step": statistics.median(runs[name]) / trained[name]} for name in settings}
    every, window = settings
    ratios = [w / e for w, e in zip(runs[window], runs[every])]
    result["window_over_every_step"] = {"ratio_median": statistics.median(ratios), "ratios": ratios,
                                        "trained_steps_ratio": trained[window] / trained[every]}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=("tiny-sd3", "tiny-sd", "sd15"), default=["tiny-sd3"])
    parser.add_argument("--width", type=int, default=1, help="widen the tiny models' denoiser this many times")
    parser.add_argument("--resolution", type=int, default=None, help="default: 32 for tiny models, 512 for sd15")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--batch", type=int, default=8, help="images per rollout (one pipeline call)")
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--window", type=int, default=2, help="window size for the training comparison")
    parser.add_argument("--rounds", type=int, default=9, help="measured sampling rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=3, help="optimizer steps per training run")
    parser.add_argument("--train-rounds", type=int, default=3, help="alternated training runs of each kind")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="sampling times as wall-clock or as this process's CPU time (a shared CPU)")
    parser.add_argument("--no-training", action="store_true", help="measure the sampling only")
    parser.add_argument("--json", default=None, help="also write the result here")
    opts = parser.parse_args(argv)
    opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for model in opts.model:
        resolution = opts.resolution or (512 if model == "sd15" else 32)
        run = argparse.Namespace(**{**vars(opts), "resolution": resolution})
        with tempfile.TemporaryDirectory() as workdir:
            def model_for():
                return load_model(model, workdir, opts.device, opts.width)

            result = {"model": model, "width": opts.width, "device": opts.device, "clock": opts.clock,
                      "resolution": resolution, "steps": opts.steps, "batch": opts.batch, "guidance": opts.guidance,
                      "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg(),
                      "sampling": sampling(trainer_for(model_for(), run, workdir), run)}
            if not opts.no_training:
                result["training"] = training(model_for, run, workdir)
            result["load_after"] = os.getloadavg()
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
