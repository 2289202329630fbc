"""Memory of a full fine-tune's reference: a frozen copy of the denoiser, or none with `precompute_ref_errors`.

Each setting runs in its own process: build the pipeline (bench_step.py's models, random weights), construct a
full-fine-tune `DiffusionDPOTrainer` with cached latents and text embeddings, optionally train `--steps` steps, and
report the denoiser parameters the process holds (every live UNet/transformer instance counted) and its peak memory:
CUDA's `max_memory_allocated` on a GPU, the peak RSS on CPU.

    python benchmarks/bench_reference_memory.py --model sd15 --resolution 256

See docs/performance.md.
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(opts, precompute: bool) -> dict:
    import torch
    from diffusers import ModelMixin

    from bench_step import build_pipeline
    from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer
    from diffusion_dpo_trainer.testing import make_preference_dataset

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as workdir:
        pipeline = build_pipeline(opts.model, workdir, torch.float32)
        args = DiffusionDPOConfig(
            output_dir=os.path.join(workdir, "out"), resolution=opts.resolution, per_device_train_batch_size=1,
            max_steps=max(opts.steps, 1), learning_rate=1e-6, report_to="none", save_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=False, use_cpu=not cuda, optim=opts.optim,
            precompute_latents=True, precompute_text_embeddings=True, precompute_ref_errors=precompute,
        )
        trainer = DiffusionDPOTrainer(model=pipeline, args=args, train_dataset=make_preference_dataset(
            n=4, size=opts.resolution))
        del pipeline
        gc.collect()
        denoisers = [o for o in gc.get_objects() if isinstance(o, ModelMixin) and o is not trainer.family.vae
                     and type(o) is type(trainer.model)]
        held = sum(p.numel() for d in denoisers for p in d.parameters())
        after_init = torch.cuda.memory_allocated() if cuda else None
        if opts.steps:
            trainer.train()
    result = {"precompute_ref_errors": precompute, "denoiser_instances": len(denoisers),
              "denoiser_parameters": held, "ref_model_is_none": trainer.ref_model is None}
    if cuda:
        result.update(allocated_after_init_gib=after_init / 2**30, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd15", "sdxl", "tiny"), default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=0, help="training steps after construction (0: construct only)")
    parser.add_argument("--optim", default="adamw_torch_fused")
    parser.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child is not None:
        print(json.dumps(measure(opts, opts.child == "1")))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    results = []
    for precompute in ("0", "1"):
        done = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                               "--child", precompute], env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
