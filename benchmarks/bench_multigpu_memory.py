"""Per-process peak memory of a full fine-tune of an SD1.5-architecture UNet on 2 processes: DDP against FSDP2.

Each setup is started with `accelerate launch --config_file examples/accelerate/<ddp|fsdp>.yaml --num_processes 2`
on this machine's CPUs (gloo; `allow_fsdp_on_cpu` lifts accelerate's GPU-only FSDP gate), with the UNet built from its
public config (random weights, bench_step.SD15_UNET) and the benchmark's slim VAE and 2-layer text encoder. Every rank
reports its peak RSS over the whole run (`getrusage`: building the pipeline, sharding, training) and over the training
steps alone (Linux VmHWM, reset when training begins), and how much of the policy and of the frozen reference it holds.

    PYTHONPATH=. python benchmarks/bench_multigpu_memory.py --resolution 64 --steps 2 --json out.json
    PYTHONPATH=. python benchmarks/bench_multigpu_memory.py --model tiny --resolution 32   # smoke run

See benchmarks/README.md and docs/multi-gpu.md.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_step import build_pipeline, machine  # noqa: E402

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer  # noqa: E402
from diffusion_dpo_trainer.testing import allow_fsdp_on_cpu, make_preference_dataset  # noqa: E402

GIB = 2**30


def _available() -> int:
    """MemAvailable of the machine, in bytes (Linux)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _vm_hwm() -> int:
    """The process's peak resident set since the last reset, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class _TrainingPeak(TrainerCallback):
    """Resets the peak-RSS mark when training begins and reads it when it ends."""

    def __init__(self):
        self.peak = None

    def on_train_begin(self, args, state, control, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    def on_train_end(self, args, state, control, **kwargs):
        self.peak = _vm_hwm()


def _held(module) -> tuple[int, int]:
    """Parameter elements this process holds of `module` (FSDP2 shards are DTensors), and the full count."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return local, sum(p.numel() for p in params)


def worker(opts) -> None:
    """One rank: build the pipeline, train `--steps` full fine-tune steps, write this rank's figures."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    workdir = tempfile.mkdtemp()
    pipeline = build_pipeline(opts.model, workdir, torch.bfloat16)
    args = DiffusionDPOConfig(
        output_dir=os.path.join(workdir, "out"), resolution=opts.resolution, per_device_train_batch_size=1,
        max_steps=opts.steps, optim="sgd", learning_rate=1e-5, bf16=True, save_strategy="no", report_to="none",
        use_cpu=True, dataloader_pin_memory=False, seed=0, disable_tqdm=True,
    )
    allow_fsdp_on_cpu(args)
    peak = _TrainingPeak()
    trainer = DiffusionDPOTrainer(model=pipeline, args=args, callbacks=[peak],
                                  train_dataset=make_preference_dataset(n=world * opts.steps, size=opts.resolution))
    trainer.train()
    policy, reference = _held(trainer.model), _held(trainer.ref_model)
    report = {"rank": trainer.accelerator.process_index, "distributed_type": trainer.accelerator.distributed_type.value,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
              "training_peak_rss_gib": peak.peak / GIB,
              "policy_held": policy[0] / policy[1], "reference_held": reference[0] / reference[1]}
    with open(os.path.join(opts.report_dir, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f)


def launch(setup: str, opts) -> list[dict]:
    report_dir = tempfile.mkdtemp()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "examples", "accelerate", f"{setup}.yaml"), "--num_processes", "2",
               "--mixed_precision", "bf16", os.path.abspath(__file__), "--worker", "--report-dir", report_dir,
               "--model", opts.model, "--resolution", str(opts.resolution), "--steps", str(opts.steps)]
    # Tensors over 1 MiB get their own mmap, returned to the system when freed, so RSS follows the live tensors
    # instead of what glibc's heap keeps after a transient peak (the same for both setups).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    print(f"[{setup}] {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    while process.poll() is None:  # on a shared machine, stop before the kernel's OOM killer picks someone else
        time.sleep(2)
        if _available() < opts.min_available_gib * GIB:
            os.killpg(process.pid, signal.SIGTERM)
            sys.exit(f"[{setup}] stopped: less than {opts.min_available_gib} GiB of memory left on the machine")
    if process.returncode:
        sys.exit(f"[{setup}] failed with exit status {process.returncode}")
    return [json.load(open(os.path.join(report_dir, f"rank{rank}.json"))) for rank in (0, 1)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="tiny: the test pipeline, a smoke run")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--setups", nargs="+", choices=("ddp", "fsdp"), default=["ddp", "fsdp"])
    parser.add_argument("--min-available-gib", type=float, default=1.0,
                        help="stop a run when the machine has less memory available than this")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-dir", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        return worker(opts)
    results = {"machine": machine(), "model": opts.model, "resolution": opts.resolution, "steps": opts.steps,
               "setups": {setup: launch(setup, opts) for setup in opts.setups}}
    print("| setup | distributed type | peak RSS per process, whole run (GiB) | during training (GiB) | "
          "policy held | reference held |")
    print("|---|---|---|---|---|---|")
    for setup, ranks in results["setups"].items():
        def cell(key, fmt="{:.2f}"):
            return " / ".join(fmt.format(rank[key]) for rank in ranks)
        print(f"| {setup} | {ranks[0]['distributed_type']} | {cell('peak_rss_gib')} | {cell('training_peak_rss_gib')} | "
              f"{cell('policy_held', '{:.0%}')} | {cell('reference_held', '{:.0%}')} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
