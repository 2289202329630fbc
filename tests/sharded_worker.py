"""The ranks of the sharded runs in test_sharded.py, started with `accelerate launch --config_file` and one of the
shipped configs in examples/accelerate/ (FSDP2 or DeepSpeed ZeRO); `run(..., single=True)` is the one-process run
with the same global batch. Each run writes what the test checks to <report_dir>/<name>-rank<N>.json.

accelerate enables FSDP only for GPU-type process groups: on CPU it silently trains plain DDP, so the worker lifts that
gate (`allow_fsdp_on_cpu`) and records how much of each model a process holds, so the test can check that the
parameters really are sharded.
"""

import argparse
import json
import os

import datasets
import torch
from peft import LoraConfig
from torch.distributed.tensor import DTensor

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from diffusion_dpo_trainer.testing import allow_fsdp_on_cpu

GLOBAL_BATCH = 2
BETA = 100  # rewards are beta/2 times an mse difference: a small beta keeps float noise from dominating them
STEPS = 3


def held(module: torch.nn.Module) -> dict:
    """How many parameter elements this process holds of `module`, against its full size, and how they are held:
    FSDP2 shards are DTensors, ZeRO-3 partitions carry `ds_tensor` (the local part) and `ds_numel` (the full size)."""
    local = total = 0
    kinds = set()
    for p in module.parameters():
        if isinstance(p, DTensor):
            local, total, kind = local + p.to_local().numel(), total + p.numel(), "dtensor"
        elif hasattr(p, "ds_tensor"):
            local, total, kind = local + p.ds_tensor.numel(), total + p.ds_numel, "zero3"
        else:
            local, total, kind = local + p.numel(), total + p.numel(), "tensor"
        kinds.add(kind)
    return {"local": local, "total": total, "kinds": sorted(kinds)}


def run(pipeline_path: str, data_dir: str, output_dir: str, report_dir: str, name: str, lora: bool,
        single: bool = False, resume: str | None = None) -> None:
    world = 1 if single else int(os.environ.get("WORLD_SIZE", "1"))
    args = DiffusionDPOConfig(
        output_dir=output_dir, resolution=32, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        beta=BETA, learning_rate=1e-3 if lora else 1e-4, logging_steps=1, save_strategy="steps", save_steps=2,
        report_to="none", seed=0, use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True,
    )
    allow_fsdp_on_cpu(args)
    peft_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v"]) if lora else None
    trainer = DiffusionDPOTrainer(model=pipeline_path, args=args, peft_config=peft_config,
                                  train_dataset=datasets.load_from_disk(data_dir))
    rank = trainer.accelerator.process_index
    report = {"world": trainer.accelerator.num_processes, "distributed_type": trainer.accelerator.distributed_type.value,
              "writes": 0, "local_metrics": []}
    pop, write_card = trainer._pop_metrics, trainer._write_model_card

    def recording_pop(mode):
        report["local_metrics"].append({k: torch.stack(v).float().mean().item() for k, v in trainer._metrics[mode].items()})
        return pop(mode)

    def counting_card(*a, **k):  # the card is written with the weights, by whichever process writes them
        report["writes"] += 1
        return write_card(*a, **k)

    trainer._pop_metrics, trainer._write_model_card = recording_pop, counting_card
    trainer.train(resume_from_checkpoint=resume)
    report["policy"] = held(trainer.model)
    report["reference"] = held(trainer.ref_model) if trainer.ref_model is not None else None
    trainer.save_model()
    report["log_history"] = trainer.state.log_history
    with open(os.path.join(report_dir, f"{name}-rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for positional in ("pipeline", "data_dir", "work_dir"):
        parser.add_argument(positional)
    parser.add_argument("runs", nargs="+", help="lora, full, or full-resumed (full, resumed from its checkpoint-2)")
    cli = parser.parse_args()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # DeepSpeed compiles a shared-memory all-reduce kernel for CPU on first use (minutes); gloo does the same.
        import deepspeed.comm.torch
        deepspeed.comm.torch.build_shm_op = lambda: None
    reports = os.path.join(cli.work_dir, "reports")
    for name in cli.runs:
        resume = os.path.join(cli.work_dir, "full", "checkpoint-2") if name == "full-resumed" else None
        run(cli.pipeline, cli.data_dir, os.path.join(cli.work_dir, name), reports, name, lora=name == "lora",
            resume=resume)
