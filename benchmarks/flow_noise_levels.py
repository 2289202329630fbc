"""Noise levels the trainer draws for flow-matching models, per `weighting_scheme` and `logit_mean`.

Runs the families' own `sample_timesteps` and `sigmas_for` on the offline test pipelines, whose schedulers have the
real SD3 (static shift 3) and FLUX.1 (dynamic shifting, unshifted in training) configurations, and prints E[s],
the median s, E[s^2] (the factor between x0-target and velocity errors) and E[(1 - s)^2] (the factor between
velocity and epsilon errors, behind the family betas in docs/flow-models.md).

    PYTHONPATH=. python benchmarks/flow_noise_levels.py [--samples 200000]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from diffusion_dpo_trainer import DiffusionDPOConfig
from diffusion_dpo_trainer.families import load_family
from diffusion_dpo_trainer.testing import make_flux_pipeline, make_sd3_pipeline

SETTINGS = [("logit_normal", -1.0), ("logit_normal", 0.0), ("logit_normal", 1.0), ("uniform", 0.0)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    options = parser.parse_args()
    torch.manual_seed(0)
    print("| family | weighting_scheme | logit_mean | E[s] | median s | E[s^2] | E[(1-s)^2] |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("SD3", make_sd3_pipeline), ("FLUX.1", make_flux_pipeline)):
            path = make(Path(tmp) / name)
            for scheme, logit_mean in SETTINGS:
                args = DiffusionDPOConfig(output_dir=tmp, weighting_scheme=scheme, logit_mean=logit_mean)
                family = load_family(path, args=args)
                s = family.sigmas_for(family.sample_timesteps(options.samples, torch.device("cpu")))
                print(f"| {name} | {scheme} | {logit_mean:g} | {s.mean():.3f} | {s.median():.3f} | "
                      f"{(s ** 2).mean():.3f} | {((1 - s) ** 2).mean():.3f} |")


if __name__ == "__main__":
    main()
