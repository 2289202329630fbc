"""Stochastic sampler steps: noise level 0 is diffusers' own step, the log-density is torch.distributions' Normal, a
recorded step recomputes to the same log-density, and on a flow whose velocity is known in closed form the stochastic
steps keep the marginals of the deterministic sampler."""

import functools
import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffusion_dpo_trainer import sde

SHAPE = (3, 4, 5, 5)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def normal_log_prob(step):
    """The reference: torch.distributions on the same mean and std, averaged over every element of a sample."""
    dist = torch.distributions.Normal(step.mean.double(), step.std.double().expand_as(step.mean))
    return dist.log_prob(step.prev_sample.double()).flatten(1).mean(1)


FLOW_STEPS = {
    "flow_sde": lambda x, v, s, sn, level, **kw: sde.flow_sde_step(x, v, s, sn, noise_level=level, **kw),
    "dance": lambda x, v, s, sn, level, **kw: sde.dance_sde_step(x, v, s, sn, eta=level, **kw),
    "cps": lambda x, v, s, sn, level, **kw: sde.cps_step(x, v, s, sn, noise_level=level, **kw),
}


def flow_scheduler(steps=6):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def ddim_scheduler(prediction_type="epsilon", steps=5, **config):
    config = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, **config}
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, **config)
    scheduler.set_timesteps(steps)
    return scheduler


# ----- noise level 0 is the pipeline's deterministic sampler ----------------------------------------------------------
@pytest.mark.parametrize("name", FLOW_STEPS)
def test_noise_level_zero_is_diffusers_flow_euler_step(name):
    scheduler = flow_scheduler()
    v, x = tensors()
    for t in scheduler.timesteps:
        expected = scheduler.step(v, t, x).prev_sample
        sigma, sigma_next = sde.flow_sigmas(scheduler, t.repeat(SHAPE[0]))
        generator = torch.Generator().manual_seed(1)
        got = FLOW_STEPS[name](x, v, sigma, sigma_next, 0.0, generator=generator).prev_sample
        if name == "cps":  # the same step written through x0_hat and eps_hat: equal up to float rounding
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
        else:
            assert torch.equal(got, expected)
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(1).get_state())  # nothing drawn
        x = expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta_zero_is_diffusers_ddim_step(prediction_type):
    scheduler = ddim_scheduler(prediction_type)
    out, x = tensors()
    for t in scheduler.timesteps:
        expected = scheduler.step(out, t, x, eta=0.0).prev_sample
        a_t, a_prev = sde.ddim_alphas(scheduler, t.repeat(SHAPE[0]))
        got = sde.ddim_step(x, out, a_t, a_prev, eta=0.0, prediction_type=prediction_type).prev_sample
        assert torch.equal(got, expected)
        x = expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_eta_is_diffusers_step_with_its_noise(prediction_type):
    """diffusers' DDIMScheduler.step(eta, variance_noise=z) = mean + std * z: the same mean and std as ours."""
    scheduler = ddim_scheduler(prediction_type)
    out, x = tensors()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for t in scheduler.timesteps[:-1]:
        prev = scheduler.step(out, t, x, eta=0.7, variance_noise=z).prev_sample
        a_t, a_prev = sde.ddim_alphas(scheduler, t.repeat(SHAPE[0]))
        step = sde.ddim_step(x, out, a_t, a_prev, eta=0.7, prediction_type=prediction_type, prev_sample=prev)
        torch.testing.assert_close((prev - step.mean) / step.std, z, rtol=0, atol=1e-4)
        x = prev


def test_ddim_alphas_use_final_alpha_before_timestep_zero_and_refuse_thresholding():
    scheduler = ddim_scheduler(set_alpha_to_one=True)
    a_t, a_prev = sde.ddim_alphas(scheduler, scheduler.timesteps)
    assert torch.equal(a_t, scheduler.alphas_cumprod[scheduler.timesteps])
    assert a_prev[-1].item() == 1.0  # the last step lands on x0: final_alpha_cumprod, not alphas_cumprod[0]
    assert torch.equal(a_prev[:-1], scheduler.alphas_cumprod[scheduler.timesteps[1:]])
    with pytest.raises(ValueError, match="thresholding"):
        sde.ddim_alphas(ddim_scheduler(thresholding=True), scheduler.timesteps)


# ----- the formulas as the papers write them --------------------------------------------------------------------------
def test_flow_sde_mean_std_and_noise_scale_are_flow_grpos():
    v, x = tensors()
    sigma, sigma_next, a = torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.6, 0.3, 0.0]), 0.7
    step = sde.flow_sde_step(x, v, sigma, sigma_next, noise_level=a, generator=torch.Generator().manual_seed(0))
    s = (a * torch.sqrt(sigma / (1 - sigma))).view(-1, 1, 1, 1)
    sg, dt = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1)
    torch.testing.assert_close(step.mean, x + (v + s**2 / (2 * sg) * (x + (1 - sg) * v)) * dt)
    torch.testing.assert_close(step.std, s * torch.sqrt(-dt))
    torch.testing.assert_close(sde.flow_sde_noise_scale(sigma, sigma_next, a, x), s)


def test_flow_sde_at_sigma_one_uses_the_next_sigma_as_flow_grpo_does():
    v, x = tensors()
    step = sde.flow_sde_step(x, v, 1.0, 0.9, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert sde.flow_sde_noise_scale(1.0, 0.9, 0.7, x).item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.9)), rel=1e-6)
    assert step.std.max().item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1), rel=1e-5)
    assert torch.isfinite(step.prev_sample).all() and torch.isfinite(step.log_prob).all()


def test_dance_step_is_dancegrpos_score_form():
    v, x = tensors()
    sigma, sigma_next, eta = 0.7, 0.55, 0.3
    step = sde.dance_sde_step(x, v, sigma, sigma_next, eta=eta, generator=torch.Generator().manual_seed(0))
    dsigma = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - x0_hat * (1 - sigma)) / sigma**2
    torch.testing.assert_close(step.mean, x + dsigma * v - 0.5 * eta**2 * score * dsigma)
    torch.testing.assert_close(step.std.squeeze(), torch.tensor(eta * math.sqrt(sigma - sigma_next)))


def test_cps_keeps_the_flow_coefficients():
    v, x = tensors()
    sigma, sigma_next, level = 0.7, 0.4, 0.8
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    std = sigma_next * math.sin(level * math.pi / 2)
    x0_hat, eps_hat = x - sigma * v, x + (1 - sigma) * v
    prev = (1 - sigma_next) * x0_hat + math.sqrt(sigma_next**2 - std**2) * eps_hat + std * z
    step = sde.cps_step(x, v, sigma, sigma_next, noise_level=level, prev_sample=prev)
    torch.testing.assert_close((prev - step.mean) / step.std, z, rtol=0, atol=1e-5)
    flow_grpo = sde.cps_step(x, v, sigma, sigma_next, noise_level=level, prev_sample=prev, unnormalized_log_prob=True)
    torch.testing.assert_close(flow_grpo.log_prob, -((prev - step.mean) ** 2).flatten(1).mean(1))


# ----- log-densities --------------------------------------------------------------------------------------------------
def all_steps(v, x, **kw):
    scheduler = ddim_scheduler("v_prediction")
    a_t, a_prev = sde.ddim_alphas(scheduler, scheduler.timesteps[1].repeat(SHAPE[0]))
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.35]), torch.tensor([0.8, 0.45, 0.2])
    return {
        "flow_sde": sde.flow_sde_step(x, v, sigma, sigma_next, noise_level=0.7, **kw),
        "dance": sde.dance_sde_step(x, v, sigma, sigma_next, eta=0.3, **kw),
        "cps": sde.cps_step(x, v, sigma, sigma_next, noise_level=0.8, **kw),
        "ddim": sde.ddim_step(x, v, a_t, a_prev, eta=1.0, prediction_type="v_prediction", **kw),
    }


def test_log_prob_is_the_normal_density_averaged_over_elements_and_recomputes_exactly():
    v, x = tensors()
    drawn = all_steps(v, x, generator=torch.Generator().manual_seed(0))
    v_train = v.clone().requires_grad_(True)
    for name, step in drawn.items():
        assert step.log_prob.shape == (SHAPE[0],) and step.log_prob.dtype == torch.float32
        torch.testing.assert_close(step.log_prob.double(), normal_log_prob(step), rtol=1e-6, atol=1e-6)
        again = all_steps(v_train, x, prev_sample=step.prev_sample)[name]
        assert torch.equal(again.log_prob, step.log_prob), name  # training recomputes the rollout's number exactly
        again.log_prob.sum().backward()
        assert v_train.grad.abs().sum() > 0  # the gradient reaches the model output through the mean
        v_train.grad = None


@pytest.mark.parametrize("name", ["flow_sde", "dance", "cps", "cps_unnormalized"])
def test_log_prob_does_not_depend_on_the_latents_memory_layout_or_the_sigmas_shape(name):
    """FLUX.2's pipeline steps on a permuted view of its latents (tokens over channels-first memory) with one sigma
    for the batch; training recomputes the step on contiguous recorded latents with one sigma per image. The
    log-density must come out bit for bit the same, or the importance ratio on fresh samples is not exactly 1."""
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(4, 16, 64, generator=g).transpose(1, 2) for _ in range(2))  # (B, tokens, channels) views
    step = FLOW_STEPS.get(name) or functools.partial(sde.cps_step, unnormalized_log_prob=True)
    sampled = step(x, v, torch.tensor(0.8), torch.tensor(0.6), 0.7, generator=torch.Generator().manual_seed(1))
    assert not x.is_contiguous()
    again = step(x.contiguous(), v.contiguous(), torch.full((4,), 0.8), torch.full((4,), 0.6), 0.7,
                 prev_sample=sampled.prev_sample.contiguous())
    assert torch.equal(again.log_prob, sampled.log_prob)


def test_log_prob_is_computed_in_float32_from_bf16_inputs():
    v, x = tensors()
    step = sde.flow_sde_step(x.bfloat16(), v.bfloat16(), 0.6, 0.5, generator=torch.Generator().manual_seed(0))
    assert step.prev_sample.dtype == step.mean.dtype == step.log_prob.dtype == torch.float32


def test_deterministic_step_has_no_density_and_bad_input_is_named():
    v, x = tensors()
    step = sde.flow_sde_step(x, v, 0.6, 0.5, noise_level=0.0, prev_sample=x)
    assert torch.isnan(step.log_prob).all()  # a step that was never stochastic cannot be trained on
    with pytest.raises(ValueError, match="not both"):
        sde.flow_sde_step(x, v, 0.6, 0.5, prev_sample=x, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"one value per sample \(3,\)"):
        sde.flow_sde_step(x, v, torch.tensor([0.6, 0.5]), 0.4)
    with pytest.raises(ValueError, match="prediction_type"):
        sde.ddim_step(x, v, 0.5, 0.6, prediction_type="flow")


# ----- marginals on a closed-form flow --------------------------------------------------------------------------------
# Data x0 ~ N(M, C^2) per element and x_s = (1 - s) x0 + s eps: x_s ~ N((1 - s) M, (1 - s)^2 C^2 + s^2), and the exact
# velocity E[eps - x0 | x_s = x] is affine in x (jointly Gaussian). N samples give a mean/std standard error of about
# sd/sqrt(N) and sd/sqrt(2N) (< 0.0016 here), so 5 standard errors is 0.008; a sampler with a wrong drift or noise
# misses by more than 0.1. Both samplers also carry the time discretisation error of 40 Euler steps, which the
# deterministic sampler measures in the same run; the stochastic one must do no worse than it, plus the sampling error.
M, C, N = 0.8, 0.5, 100_000


def flow_marginal(s, c=C):
    return (1 - s) * M, math.sqrt((1 - s) ** 2 * c**2 + s**2)


def flow_velocity(x, s, c=C):
    var = (1 - s) ** 2 * c**2 + s**2
    return -M + (s - (1 - s) * c**2) / var * (x - (1 - s) * M)


def flow_errors(step_fn, sigmas, level, c=C):
    """Worst marginal error over the steps, starting from the exact marginal at sigmas[0]."""
    g = torch.Generator().manual_seed(0)
    mean, sd = flow_marginal(sigmas[0].item(), c)
    x = mean + sd * torch.randn(N, 1, generator=g)
    errors = []
    for s, s_next in itertools.pairwise(sigmas):
        x = step_fn(x, flow_velocity(x, s.item(), c), s, s_next, level, generator=g).prev_sample
        mean, sd = flow_marginal(s_next.item(), c)
        errors.append(max(abs(x.mean().item() - mean), abs(x.std().item() - sd)))
    return errors


def test_flow_sde_and_dance_keep_the_deterministic_samplers_marginals():
    # From sigma 0.9: Flow-GRPO's noise scale grows without bound as sigma -> 1, where Euler-Maruyama's first step is
    # coarse whatever the step count (flow_grpo trains with it anyway); the marginals are a statement about the SDE.
    sigmas = torch.linspace(0.9, 0.0, 41)
    deterministic = max(flow_errors(FLOW_STEPS["flow_sde"], sigmas, 0.0))
    assert deterministic < 0.03  # the closed form is right: the ODE sampler itself lands on the marginals
    for name, level in (("flow_sde", 0.7), ("dance", 0.7)):
        assert max(flow_errors(FLOW_STEPS[name], sigmas, level)) < deterministic + 0.008, name


def test_cps_preserves_marginals_exactly_when_x0_is_known():
    """CPS's claim: given the true x0 (a point-mass target), each step lands exactly on the flow's marginal
    N((1 - s') x0, s'^2), at any step size and noise level. (On a spread target x0_hat is a posterior mean and a
    large noise level loses spread: see docs/on-policy-math.md.)"""
    errors = flow_errors(FLOW_STEPS["cps"], torch.linspace(1.0, 0.0, 6)[1:], 0.8, c=0.0)
    assert max(errors) < 0.008


def ddim_errors(steps, eta):
    """Worst marginal error over the steps of DDIM on the exact epsilon of the Gaussian target."""
    scheduler = ddim_scheduler(steps=steps)
    g = torch.Generator().manual_seed(0)
    a0 = scheduler.alphas_cumprod[scheduler.timesteps[0]].item()
    x = math.sqrt(a0) * M + math.sqrt(a0 * C**2 + 1 - a0) * torch.randn(N, 1, generator=g)
    worst = 0.0
    for t in scheduler.timesteps:
        a_t, a_prev = sde.ddim_alphas(scheduler, t.view(1))
        a, ap = a_t.item(), a_prev.item()
        eps = math.sqrt(1 - a) / (a * C**2 + 1 - a) * (x - math.sqrt(a) * M)
        x = sde.ddim_step(x, eps, a_t, a_prev, eta=eta, generator=g).prev_sample
        mean, sd = math.sqrt(ap) * M, math.sqrt(ap * C**2 + 1 - ap)
        worst = max(worst, abs(x.mean().item() - mean), abs(x.std().item() - sd))
    return worst


def test_ddim_with_eta_converges_to_the_marginals_like_the_deterministic_sampler():
    """DDIM's stochastic step (eta 1, DDPM's variance) carries about twice the ODE's first-order time-discretisation
    error at equal steps (measured: 0.089 vs 0.053 at 20 steps, 0.056 vs 0.028 at 40); both halve as the steps
    double. A wrong mean or variance leaves an error that does not shrink."""
    deterministic, coarse, fine = ddim_errors(40, 0.0), ddim_errors(20, 1.0), ddim_errors(40, 1.0)
    assert deterministic < 0.035
    assert fine < 0.65 * coarse
    assert fine < 2.5 * deterministic
