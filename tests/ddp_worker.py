"""One rank of the 2-process DDP run in test_distributed.py (launched with torch.distributed.run), or, with
--single, the single-process run with the same global batch. Writes what the test checks to <report_dir>/rank<N>.json.
With --streamed the dataset is streamed (`to_iterable_dataset`, no caching) and each rank records the rows it collated.
"""

import argparse
import json
import os
import datasets
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer

GLOBAL_BATCH = 2
BETA = 100  # rewards are beta/2 times an mse difference: a small beta keeps float noise from dominating them
CACHING = {"precompute_latents": True, "precompute_text_embeddings": True}


def run(pipeline_path: str, data_dir: str, output_dir: str, report_dir: str, single: bool = False,
        streamed: bool = False) -> None:
    """`data_dir` holds a dataset saved with `save_to_disk`: file-backed, as real datasets are, so the main process's
    latent cache is found by the other ranks instead of being recomputed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = DiffusionDPOConfig(
        output_dir=output_dir,
        resolution=32,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=3,
        beta=BETA,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        seed=0,
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **({} if streamed else CACHING),
    )
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    report = {"saves": 0, "cards": 0, "vae_images": 0, "local_metrics": [], "rows": []}

    def count_images(module, inputs):
        report["vae_images"] += inputs[0].shape[0]

    # Hooked before the trainer exists: the latent cache is computed in its constructor.
    pipeline = DiffusionPipeline.from_pretrained(pipeline_path)
    pipeline.vae.encoder.register_forward_pre_hook(count_images)
    dataset = datasets.load_from_disk(data_dir)
    trainer = DiffusionDPOTrainer(model=pipeline, args=args, peft_config=lora,
                                  train_dataset=dataset.to_iterable_dataset() if streamed else dataset)
    collate = trainer.data_collator

    def recording_collate(rows):
        report["rows"].append([row["row_index"] for row in rows])
        return collate(rows)

    trainer.data_collator = recording_collate
    rank = trainer.accelerator.process_index
    report.update(rank=rank, world=trainer.accelerator.num_processes)

    # Count writes and VAE work on this rank, and keep this rank's own metrics before they are averaged.
    save_lora, write_card, pop = trainer.family.save_lora_weights, trainer._write_model_card, trainer._pop_metrics

    def counting_save(*a, **k):
        report["saves"] += 1
        return save_lora(*a, **k)

    def counting_card(*a, **k):
        report["cards"] += 1
        return write_card(*a, **k)

    def recording_pop(mode):
        local = {name: torch.stack(values).float().mean().item() for name, values in trainer._metrics[mode].items()}
        report["local_metrics"].append(local)
        return pop(mode)

    trainer.family.save_lora_weights, trainer._write_model_card, trainer._pop_metrics = (
        counting_save, counting_card, recording_pop)

    trainer.train()
    trainer.save_model()
    report["log_history"] = trainer.state.log_history
    report["lora"] = {k: v.tolist() for k, v in trainer.model.state_dict().items() if "lora" in k} if rank == 0 else {}
    name = f"rank{rank}{'-single' if single else ''}{'-streamed' if streamed else ''}.json"
    with open(os.path.join(report_dir, name), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline")
    parser.add_argument("data_dir")
    parser.add_argument("output_dir")
    parser.add_argument("report_dir")
    parser.add_argument("--streamed", action="store_true")
    cli = parser.parse_args()
    run(cli.pipeline, cli.data_dir, cli.output_dir, cli.report_dir, streamed=cli.streamed)
