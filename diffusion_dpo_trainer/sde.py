"""Stochastic sampler steps and the Gaussian log-density of each transition: what a GRPO importance ratio is made of.

GRPO needs a policy whose every sampling step is a Gaussian with a known density. Each function here takes one
step's input latents, model output and noise schedule values, `fn(sample, model_output, sigma, sigma_next,
noise_level, generator=None)` (the form the rollout's `FunctionStep` calls), and returns an `SDEStep`: the next
latents (drawn from `generator`, or the recorded `prev_sample` given back to recompute a rollout's log-density during
training), the log-density of that sample averaged over latent elements, and the step's mean and standard deviation.
Everything is computed in float32 (bf16 overflows in the mean, flow_grpo sd3_sde_with_logprob.py:34) and with noise
level 0 every step is the pipeline's own deterministic sampler.

Sources (file:line at the commits named in docs/on-policy-math.md):
- Flow-SDE: flow_grpo `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:47-68` (Flow-GRPO, arXiv 2505.05470).
- DanceGRPO's flow step: DanceGRPO `fastvideo/train_grpo_flux.py:131-168` (`flux_step`, arXiv 2505.07818).
- Coefficients-Preserving Sampling: FlowCPS `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:51-70` (arXiv
  2509.05952), the same as flow_grpo's later `sde_type == 'cps'`.
- DDIM with eta > 0: ddpo-pytorch `ddpo_pytorch/diffusers_patch/ddim_with_logprob.py:93-190` (DDPO, arXiv
  2305.13301), on diffusers' `DDIMScheduler.step` alphas.
"""

import math
from typing import NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor


class SDEStep(NamedTuple):
    """One stochastic sampler step: the next latents, their log-density (B,), and the transition's mean and standard
    deviation, so the density is `Normal(mean, std)`. All float32."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A schedule value (a float, a 0-d tensor or one per sample) as float32, broadcastable to `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.numel() == 1:
        return value.reshape((1,) * like.ndim)
    if value.ndim == 1 and value.shape[0] == like.shape[0]:
        return value.reshape(-1, *([1] * (like.ndim - 1)))
    raise ValueError(f"a schedule value of shape {tuple(value.shape)} for latents of shape {tuple(like.shape)}: "
                     f"expected a scalar or one value per sample ({like.shape[0]},).")


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log Normal(sample; mean, std) per element, averaged over every dimension but the batch, for a std that is one
    per sample (a scalar or of shape (B, 1, ..., 1), as the steps give it).

    The average (not the sum) is the published convention (ddim_with_logprob.py:189, sd3_sde_with_logprob.py:67): it
    is why the published clip range is ~1e-4. With std constant over a sample it is -mean((sample - mean)^2) / (2 std^2)
    - log std - log(2 pi) / 2, so only the squared gap is computed per element. The gap is averaged in the sample's
    logical order (`flatten`), whatever its memory layout: FLUX.2's pipeline steps on a permuted view of its latents
    and training on contiguous ones, and a sum in memory order rounds differently, so the importance ratio on fresh
    samples would not be exactly 1. A deterministic step (std 0) has no density: its entries are NaN, so training on a
    step that was never stochastic fails loudly instead of silently.
    """
    gap = (sample - mean).square().flatten(1).mean(1)
    std = std.reshape(-1)
    stochastic = std > 0
    safe = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = -gap / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    return torch.where(stochastic, log_prob, float("nan"))


def _gaussian_step(mean, std, prev_sample, generator) -> SDEStep:
    stochastic = bool((std > 0).any())
    if prev_sample is None:
        if stochastic:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            prev_sample = mean + std * noise
        else:  # noise level 0: the deterministic step itself, bit for bit, and no draw from the generator
            prev_sample = mean
    else:
        if generator is not None:
            raise ValueError("Give either `prev_sample` (recompute a recorded step) or `generator` (draw one), "
                             "not both.")
        prev_sample = prev_sample.float()
    if not stochastic:  # no density (gaussian_log_prob's NaN), without its arithmetic: a window's other steps
        return SDEStep(prev_sample, mean.new_full(mean.shape[:1], float("nan")), mean, std)
    return SDEStep(prev_sample, gaussian_log_prob(prev_sample.detach(), mean, std), mean, std)


def _flow_drift_step(x, v, sigma, sigma_next, s, prev_sample, generator) -> SDEStep:
    """Euler-Maruyama step of the reverse SDE with the flow's marginals and diffusion s(sigma):
    mean = x + [v + s^2/(2 sigma) (x + (1 - sigma) v)] dt, std = s sqrt(-dt), written as flow_grpo writes it."""
    dt = sigma_next - sigma
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return _gaussian_step(mean, s * torch.sqrt(-dt), prev_sample, generator)


def flow_sde_noise_scale(sigma, sigma_next, noise_level: float, like: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's noise scale s = noise_level * sqrt(sigma / (1 - sigma)), per sample, broadcastable to `like`.

    At sigma = 1 that is infinite, and flow_grpo (sd3_sde_with_logprob.py:44,47) puts the schedule's second sigma in
    the denominator instead; sigma = 1 is only ever the first step, whose next sigma is that second sigma, so
    `sigma_next` stands in for it here exactly. It is also the scale flow_grpo's KL divides by (losses.grpo_loss).
    """
    sigma, sigma_next = _per_sample(sigma, like), _per_sample(sigma_next, like)
    return torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma))) * noise_level


def flow_sde_step(sample, model_output, sigma, sigma_next, noise_level: float = 0.7, *, prev_sample=None,
                  generator=None) -> SDEStep:
    """Flow-GRPO's SDE step for rectified-flow models (x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0), with the
    noise scale of `flow_sde_noise_scale`: std = s sqrt(sigma - sigma_next)."""
    x, v = sample.float(), model_output.float()
    s = flow_sde_noise_scale(sigma, sigma_next, noise_level, x)
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    return _flow_drift_step(x, v, sigma, sigma_next, s, prev_sample, generator)


def dance_sde_step(sample, model_output, sigma, sigma_next, eta: float = 0.3, *, prev_sample=None,
                   generator=None) -> SDEStep:
    """DanceGRPO's flow step (`flux_step` with sde_solver=True): the same reverse SDE with a constant noise scale eta.

    DanceGRPO writes the drift with the score of x0_hat = x - sigma v, mean = x + dsigma v - eta^2/2 * score * dsigma,
    score = -(x - (1 - sigma) x0_hat) / sigma^2; expanding x0_hat gives Flow-GRPO's drift with s = eta, and its std
    eta * sqrt(sigma - sigma_next) is s * sqrt(-dt) (so its KL scale, in flow_grpo's form, is eta).
    """
    x, v = sample.float(), model_output.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    return _flow_drift_step(x, v, sigma, sigma_next, torch.full_like(sigma, float(eta)), prev_sample, generator)


def cps_step(sample, model_output, sigma, sigma_next, noise_level: float = 0.8, *, prev_sample=None, generator=None,
             unnormalized_log_prob: bool = False) -> SDEStep:
    """Coefficients-Preserving Sampling (Wang & Yu, arXiv 2509.05952): the next latents keep exactly the flow's
    coefficients, (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) eps_hat + std z with std = sigma' sin(noise_level pi/2),
    so the injected noise never leaves the sample noisier than its sigma says.

    flow_grpo's CPS log-density keeps neither the constants nor the variance: -(prev - mean)^2 averaged over
    elements. `unnormalized_log_prob=True` returns exactly that (its published clip range, 1e-5, assumes it); the
    default is the true Gaussian log-density. The last step (sigma' = 0) is deterministic (std 0).
    """
    x, v = sample.float(), model_output.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - sigma * v
    eps_hat = x + (1 - sigma) * v
    mean = x0_hat * (1 - sigma_next) + eps_hat * torch.sqrt(sigma_next**2 - std**2)
    step = _gaussian_step(mean, std, prev_sample, generator)
    if unnormalized_log_prob:
        gap = (step.prev_sample.detach() - mean).square().flatten(1).mean(1)  # in logical order, as gaussian_log_prob
        step = step._replace(log_prob=-gap)
    return step


def ddim_step(sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta: float = 1.0, *,
              prediction_type: str = "epsilon", clip_sample_range: float | None = None, prev_sample=None,
              generator=None) -> SDEStep:
    """DDIM (Song et al., eq. 12 and 16) with eta > 0, as DDPO's `ddim_step_with_logprob`, for epsilon-, v- and
    sample-prediction models. `alpha_prod_t` / `alpha_prod_t_prev` come from `ddim_alphas`; pass the scheduler's
    `prediction_type`, and its `clip_sample_range` when `clip_sample` is on (diffusers clips x0_hat, eps is kept)."""
    x, out = sample.float(), model_output.float()
    a_t, a_prev = _per_sample(alpha_prod_t, x), _per_sample(alpha_prod_t_prev, x)
    beta_t = 1 - a_t
    if prediction_type == "epsilon":
        x0_hat, eps_hat = (x - beta_t**0.5 * out) / a_t**0.5, out
    elif prediction_type == "v_prediction":
        x0_hat, eps_hat = a_t**0.5 * x - beta_t**0.5 * out, a_t**0.5 * out + beta_t**0.5 * x
    elif prediction_type == "sample":
        x0_hat, eps_hat = out, (x - a_t**0.5 * out) / beta_t**0.5
    else:
        raise ValueError(f"prediction_type={prediction_type!r}: expected 'epsilon', 'v_prediction' or 'sample'.")
    if clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    mean = a_prev**0.5 * x0_hat + (1 - a_prev - std**2) ** 0.5 * eps_hat
    return _gaussian_step(mean, std, prev_sample, generator)


def flow_sigmas(scheduler, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, next sigma) per sample for timesteps of a `FlowMatchEulerDiscreteScheduler` after `set_timesteps`,
    found by the scheduler's own `index_for_timestep` (as flow_grpo does, sd3_sde_with_logprob.py:40-43)."""
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    index = torch.tensor([scheduler.index_for_timestep(t) for t in timesteps])
    return scheduler.sigmas[index], scheduler.sigmas[index + 1]


def ddim_alphas(scheduler, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_prod_t, alpha_prod_t_prev) per sample for a `DDIMScheduler` after `set_timesteps`, exactly as its `step`
    reads them: the previous timestep is t - num_train_timesteps // num_inference_steps, and before timestep 0 it is
    `final_alpha_cumprod`. (DDPO clamps the previous timestep to 0 first, so with `set_alpha_to_one=True` its last
    step differs from diffusers'; this follows diffusers.)"""
    if scheduler.config.thresholding:
        raise ValueError("DDIMScheduler with thresholding=True: dynamic thresholding makes x0_hat depend on the whole "
                         "sample, which this step does not reproduce; use thresholding=False.")
    t = torch.as_tensor(timesteps, device="cpu").reshape(-1).long()
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    a_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod))
    return alphas[t], a_prev
