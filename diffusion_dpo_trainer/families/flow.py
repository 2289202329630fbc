"""Rectified-flow (flow-matching) noising shared by SD3 and FLUX: x_t = (1 - s) x0 + s eps, target eps - x0.

Timesteps are drawn as diffusers' SD3/FLUX training scripts draw them: `u` from
`diffusers.training_utils.compute_density_for_timestep_sampling` (`weighting_scheme` uniform, logit_normal or mode),
mapped to an index into a fresh `FlowMatchEulerDiscreteScheduler` built from the pipeline's scheduler config, whose
`timesteps` go to the denoiser and whose `sigmas` give s. The scheduler's static shift (SD3) is therefore applied;
a resolution-dependent dynamic shift (FLUX) is not, as in diffusers' scripts.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from .base import DiffusionFamily

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")


class FlowMatchingFamily(DiffusionFamily, abstract=True):
    """Base of the flow-matching families; subclasses encode prompts and call their transformer."""

    denoiser_name = "transformer"
    #: Attention projections of the joint (image + text) attention: the image stream (to_q/k/v, to_out.0; bare names
    #: also catch SD3.5's second attention and FLUX's single blocks) and the text stream (add_*_proj, to_add_out), as
    #: in diffusers' SD3 LoRA script. Its FLUX script also adds the feed-forwards (ff.net.0.proj, ff.net.2,
    #: ff_context.net.0.proj, ff_context.net.2): pass those in `target_modules` for more capacity.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipeline, args=None):
        super().__init__(pipeline, args)
        args = self.args
        self.weighting_scheme = args.weighting_scheme
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"Unknown weighting_scheme {self.weighting_scheme!r}; expected one of {', '.join(WEIGHTING_SCHEMES)}."
            )
        self.logit_mean, self.logit_std, self.mode_scale = args.logit_mean, args.logit_std, args.mode_scale
        scheduler = self.training_scheduler()
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self._timesteps = scheduler.timesteps.float()
        self._sigmas = scheduler.sigmas.float()

    def training_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """A fresh scheduler built from the pipeline's config: the training schedule, whatever `set_timesteps` did to
        the pipeline's own. Override where the checkpoint states its shift elsewhere (Sana's DPM-Solver config)."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)

    def resolution_multiple(self) -> int:
        # Both transformers group latents in 2x2 patches (SD3's patch_size, FLUX's packing).
        return 2 * self.vae_scale_factor

    def sample_timesteps(self, batch_size, device, generator=None):
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=generator.device if generator is not None else "cpu",
            generator=generator,
        )
        # u can reach 1.0 (mode at u=0, a saturated sigmoid): clamp to the last index.
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self._timesteps[indices.to(self._timesteps.device)].to(device)

    def sigmas_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The scheduler's sigma for each (scheduler) timestep, looked up exactly as diffusers' scripts do."""
        if self._timesteps.device != timesteps.device:  # moved once, not every step
            self._timesteps, self._sigmas = self._timesteps.to(timesteps.device), self._sigmas.to(timesteps.device)
        matches = self._timesteps[None, :] == timesteps.float()[:, None]
        if not matches.any(dim=1).all():
            raise ValueError(f"Timesteps {timesteps.tolist()} are not all on the scheduler's training schedule.")
        return self._sigmas[matches.float().argmax(dim=1)]

    def schedule_timesteps(self, timesteps):
        grid = self._timesteps.to(timesteps.device)
        return grid[(grid[None, :] - timesteps.float()[:, None]).abs().argmin(dim=1)]

    def noisy_latents_and_target(self, x0, noise, timesteps):
        sigma = self.sigmas_for(timesteps).view(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - sigma) * x0 + sigma * noise, noise - x0
