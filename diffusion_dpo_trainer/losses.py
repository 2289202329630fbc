"""Diffusion preference losses as pure tensor functions of per-sample denoising errors, and their registry.

Notation: `m_w, m_l` are the policy's per-sample mse on the preferred (winner) and rejected (loser) image, `r_w, r_l`
the reference's, all of shape `(B,)`; for unpaired data `m, r` are per image, shape `(N,)`. Every loss function returns
one loss per pair (or per image); the batch mean is taken by `compute_paired_loss` / `compute_unpaired_loss`, outside
every nonlinearity. Nothing here knows about models: the trainer hands in the errors.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the first, in float32: one number per sample."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of every loss, so each loss reads what it needs and the trainer passes one object.

    `beta` is the strength for `sigmoid`, `hinge`, `ipo` and `kto`; MaPO has its own `mapo_*` values. The fields in
    `STABILISER_FIELDS` are not any one loss's: they change how every paired loss is fed and averaged (see
    `compute_paired_loss`), and are off at their defaults.
    """

    beta: float = 5000.0
    label_smoothing: float = 0.0
    mapo_beta: float = 0.1
    mapo_gamma: float = 0.5
    mapo_temperature: float = 1000.0
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    winner_preserving_mu: float | None = None
    soft_labels: str = "none"
    timestep_min: float = 0.0
    timestep_max: float = 1.0
    timestep_weight_power: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5] (0 is plain DPO).")
        for name in ("beta", "mapo_gamma", "mapo_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        for name in ("mapo_beta", "kto_desirable_weight", "kto_undesirable_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be non-negative.")
        if self.winner_preserving_mu is not None and not 0.0 <= self.winner_preserving_mu <= 1.0:
            raise ValueError(f"winner_preserving_mu={self.winner_preserving_mu} must be in [0, 1] (or None: off).")
        if self.soft_labels not in SOFT_LABEL_FORMS:
            raise ValueError(f"soft_labels={self.soft_labels!r} must be one of {list(SOFT_LABEL_FORMS)}.")
        if not 0.0 <= self.timestep_min < self.timestep_max <= 1.0:
            raise ValueError(f"timestep_min={self.timestep_min}, timestep_max={self.timestep_max}: need "
                             "0 <= timestep_min < timestep_max <= 1 (fractions of the noise schedule).")
        if self.timestep_weight_power < 0:
            raise ValueError(f"timestep_weight_power={self.timestep_weight_power} must be non-negative.")

    @classmethod
    def from_config(cls, config, beta: float) -> "LossParams":
        """Read every field but `beta` from a config object by name; `beta` comes from the trainer's one source."""
        values = {f.name: getattr(config, f.name) for f in fields(cls) if f.name != "beta" and hasattr(config, f.name)}
        return cls(beta=float(beta), **values)


#: How a per-pair soft label p (the probability that `chosen` is preferred) enters `sigmoid`: "none" (the hard label
#: 1), "smpo" (SmPO: the logit scaled by 2p - 1) or "cross_entropy" (-p*logsigmoid(z) - (1-p)*logsigmoid(-z)).
SOFT_LABEL_FORMS = ("none", "smpo", "cross_entropy")
#: LossParams fields that change how every paired loss is fed and averaged rather than one loss's formula.
STABILISER_FIELDS = ("winner_preserving_mu", "soft_labels", "timestep_min", "timestep_max", "timestep_weight_power")


# ----- paired losses: (m_w, m_l, r_w, r_l, params) -> (B,) -----------------------------------------------------------
def dpo_logits(m_w, m_l, r_w, r_l, beta: float) -> torch.Tensor:
    """z = -beta/2 * ((m_w - r_w) - (m_l - r_l)): positive when the policy improved more on the winner."""
    return -0.5 * beta * ((m_w - r_w) - (m_l - r_l))


def sigmoid_loss(m_w, m_l, r_w, r_l, params: LossParams, label: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion-DPO: -logsigmoid(z); with label smoothing eps, conservative DPO (the label is wrong w.p. eps).

    A per-pair soft `label` p (`params.soft_labels`): SmPO scales the logit, z -> (2p - 1) z, so a tie (p = 0.5)
    gives no gradient; `cross_entropy` is the Bradley-Terry likelihood of p, -p*logsigmoid(z) - (1-p)*logsigmoid(-z),
    which pulls a tie's margin towards 0. Either is plain DPO at p = 1; eps then smooths the result as above.
    """
    z = dpo_logits(m_w, m_l, r_w, r_l, params.beta)
    eps = params.label_smoothing
    if label is not None and params.soft_labels == "smpo":
        z = (2.0 * label - 1.0) * z
    elif label is not None and params.soft_labels == "cross_entropy":
        p = (1.0 - eps) * label + eps * (1.0 - label)
        return -p * F.logsigmoid(z) - (1.0 - p) * F.logsigmoid(-z)
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def hinge_loss(m_w, m_l, r_w, r_l, params: LossParams) -> torch.Tensor:
    """SLiC-style hinge on the DPO logit: relu(1 - z). Pairs already ranked with margin 1 stop contributing."""
    return torch.relu(1.0 - dpo_logits(m_w, m_l, r_w, r_l, params.beta))


def ipo_loss(m_w, m_l, r_w, r_l, params: LossParams) -> torch.Tensor:
    """IPO: (h - 1/(2 beta))^2 on the unscaled margin h = (r_w - m_w) - (r_l - m_l): regresses to a fixed margin."""
    h = (r_w - m_w) - (r_l - m_l)
    return (h - 1.0 / (2.0 * params.beta)).pow(2)


def sft_loss(m_w, m_l, r_w, r_l, params: LossParams) -> torch.Tensor:
    """The supervised baseline: plain denoising error on the preferred image only."""
    return m_w


def mapo_log_odds(m: torch.Tensor, gamma: float) -> torch.Tensor:
    """s(m) = gamma*m / (exp(gamma*m) - 1), MaPO's stand-in for a log-odds; its limit 1 at m = 0 is kept finite."""
    x = gamma * m
    zero = x == 0
    safe = torch.where(zero, torch.ones_like(x), x)  # keeps 0/0 (and its NaN gradient) out of the graph
    return torch.where(zero, torch.ones_like(x), safe / torch.expm1(safe))


def mapo_loss(m_w, m_l, r_w, r_l, params: LossParams) -> torch.Tensor:
    """MaPO, reference-free: m_w - beta_m * logsigmoid(T * (s(m_w) - s(m_l)))."""
    margin = mapo_log_odds(m_w, params.mapo_gamma) - mapo_log_odds(m_l, params.mapo_gamma)
    return m_w - params.mapo_beta * F.logsigmoid(params.mapo_temperature * margin)


# ----- stabilisers of every paired loss ------------------------------------------------------------------------------
def winner_preserving_lambda(error_w: torch.Tensor, error_l: torch.Tensor, mu: float) -> torch.Tensor:
    """Diffusion-SDPO's scale of the loser's gradient, one detached number per batch (as in its reference code).

    `error_*` are the policy's prediction minus target over the batch's winners and losers. With A and B the batch
    mse of winners and losers, g_w = dA/d(prediction_w) and g_l = dB/d(prediction_l) are output-space gradients;
    lambda = clamp((1 - mu) * |g_w|^2 / (g_l . g_w), 0, 1) when g_l . g_w > 0, else 1. The common factor 2/N of both
    gradients cancels, so it is (1 - mu) * sum(e_w^2) / sum(e_w * e_l). Then the first-order change of A under the
    update -g_w + lambda*g_l is at most -mu*|g_w|^2: the winner's error does not rise.
    """
    e_w, e_l = error_w.detach().float().flatten(), error_l.detach().float().flatten()
    norm, dot = e_w.pow(2).sum(), (e_w * e_l).sum()
    cap = (1.0 - mu) * norm / torch.where(dot > 0, dot, torch.ones_like(dot))
    return torch.where(dot > 0, cap, torch.ones_like(cap)).clamp(0.0, 1.0)


def scale_gradient(values: torch.Tensor, scale) -> torch.Tensor:
    """`values` in the forward pass, `scale` times their gradient in the backward pass."""
    return values.detach() + scale * (values - values.detach())


def timestep_weights(noise_level: torch.Tensor, params: LossParams) -> torch.Tensor:
    """One weight per pair from its noise level (timestep / number of training timesteps, in [0, 1]): pairs outside
    [timestep_min, timestep_max] are masked (weight 0), the others weighted noise_level ** timestep_weight_power
    (1 at power 0), which shifts the loss towards noisier timesteps whose preference signal is weaker."""
    level = noise_level.float()
    inside = (level >= params.timestep_min) & (level <= params.timestep_max)
    return inside.float() * level.pow(params.timestep_weight_power)


def timesteps_active(params: LossParams) -> bool:
    """Whether the timestep mask or weights are switched on (else every pair weighs 1 and no level is needed)."""
    return params.timestep_min > 0.0 or params.timestep_max < 1.0 or params.timestep_weight_power != 0.0


# ----- unpaired losses: (m, r, desirable, z0, params) -> (N,) --------------------------------------------------------
def kto_reference_point(g: torch.Tensor, global_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean):
    """z0 = clamp(mean of g = r - m over the batch of all processes, min=0), detached: a baseline, not a target."""
    return global_mean(g.detach()).clamp(min=0).detach()


def kto_loss(m, r, desirable, z0, params: LossParams) -> torch.Tensor:
    """Diffusion-KTO: lambda_y * (1 - sigmoid(s_y * beta * (g - z0))), g = r - m, s_y = +1 desirable / -1 not."""
    sign = desirable.to(m.dtype) * 2.0 - 1.0
    weight = torch.where(desirable, params.kto_desirable_weight, params.kto_undesirable_weight).to(m.dtype)
    return weight * (1.0 - torch.sigmoid(sign * params.beta * ((r - m) - z0)))


@dataclass(frozen=True)
class LossSpec:
    """What the trainer must know about a loss: how to call it and what data and models it needs."""

    fn: Callable[..., torch.Tensor]
    needs_reference: bool
    paired: bool
    summary: str
    params: tuple[str, ...] = ()  # the LossParams fields it reads: what a model card must record to reproduce it
    soft_labels: bool = False  # reads a per-pair soft label (`label=`) when `soft_labels` is set


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, needs_reference=True, paired=True,
                        summary="Diffusion-DPO (arXiv 2311.12908), optional label smoothing and soft labels",
                        params=("beta", "label_smoothing"), soft_labels=True),
    "hinge": LossSpec(hinge_loss, needs_reference=True, paired=True, summary="SLiC-HF hinge (arXiv 2305.10425)",
                      params=("beta",)),
    "ipo": LossSpec(ipo_loss, needs_reference=True, paired=True, summary="IPO (arXiv 2310.12036)", params=("beta",)),
    "sft": LossSpec(sft_loss, needs_reference=False, paired=True,
                    summary="denoising loss on the preferred image (Diffusion-DPO's SFT baseline)"),
    "mapo": LossSpec(mapo_loss, needs_reference=False, paired=True,
                     summary="MaPO, reference-free (arXiv 2406.06424)",
                     params=("mapo_beta", "mapo_gamma", "mapo_temperature")),
    "kto": LossSpec(kto_loss, needs_reference=True, paired=False,
                    summary="Diffusion-KTO on unpaired data (arXiv 2404.04465)",
                    params=("beta", "kto_desirable_weight", "kto_undesirable_weight")),
}


def loss_hyperparameters(loss_types: list[tuple[str, float]], params: LossParams) -> dict:
    """The values the selected losses read (and their weights when several are mixed), then every stabiliser that
    is switched on, in a stable order."""
    values = {name: getattr(params, name) for loss, _ in loss_types for name in LOSSES[loss].params}
    defaults = LossParams()
    values.update({name: getattr(params, name) for name in STABILISER_FIELDS
                   if getattr(params, name) != getattr(defaults, name)})
    if len(loss_types) > 1:
        values["loss_weights"] = [weight for _, weight in loss_types]
    return values


def resolve_loss_types(loss_type, loss_weights=None) -> list[tuple[str, float]]:
    """Normalise `loss_type` (a name or a list) and `loss_weights` to (name, weight) pairs, rejecting bad input."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    valid = ", ".join(LOSSES)
    if not names:
        raise ValueError(f"`loss_type` is empty: give at least one of {valid}.")
    unknown = [name for name in names if name not in LOSSES]
    if unknown:
        raise ValueError(f"Unknown loss_type {unknown}; valid names are: {valid}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`loss_type` {names} names a loss twice; give each once and weight it with `loss_weights`.")
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(names):
        raise ValueError(f"`loss_weights` has {len(weights)} entries but `loss_type` has {len(names)}: {names}.")
    if any(w < 0 for w in weights):
        raise ValueError(f"`loss_weights` {weights} must be non-negative.")
    kinds = {name: "paired" if LOSSES[name].paired else "unpaired" for name in names}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"`loss_type` {names} mixes losses for paired data (prompt, chosen, rejected) and unpaired data "
            f"(prompt, image, label): {kinds}. One run trains on one kind of data; use one kind of loss."
        )
    return list(zip(names, weights))


def needs_reference(loss_types: list[tuple[str, float]]) -> bool:
    return any(LOSSES[name].needs_reference for name, _ in loss_types)


def is_paired(loss_types: list[tuple[str, float]]) -> bool:
    return LOSSES[loss_types[0][0]].paired


def compute_paired_loss(
    loss_types: list[tuple[str, float]],
    policy_mse: torch.Tensor,
    ref_mse: torch.Tensor | None,
    params: LossParams,
    *,
    label: torch.Tensor | None = None,
    noise_level: torch.Tensor | None = None,
    lose_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the batch-mean losses, and batch-mean metrics named like TRL's DPOTrainer.

    `policy_mse` and `ref_mse` hold the winners' errors first, then the losers' (shape `(2B,)`), the layout of the
    single concatenated forward pass. `ref_mse` may be None only when no selected loss needs a reference.
    The stabilisers, each optional: `label` (B,) the pairs' soft labels, read by `sigmoid` when
    `params.soft_labels` is set; `noise_level` (B,) each pair's timestep / number of training timesteps, which
    `timestep_weights` turns into per-pair weights of every loss (masked pairs count as 0 in the batch mean);
    `lose_scale` (`winner_preserving_lambda`) scales the gradient through the losers' errors, not their value.
    """
    if ref_mse is None and needs_reference(loss_types):
        raise ValueError(f"loss_type {[n for n, _ in loss_types]} needs the reference model's errors (`ref_mse`).")
    m_w, m_l = policy_mse.chunk(2)
    metrics = {
        "mse/chosen": m_w.detach().mean(),
        "mse/rejected": m_l.detach().mean(),
        "mse/margin": (m_l - m_w).detach().mean(),
    }
    r_w = r_l = None
    if ref_mse is not None:
        r_w, r_l = ref_mse.detach().chunk(2)
        chosen_rewards = -0.5 * params.beta * (m_w.detach() - r_w)
        rejected_rewards = -0.5 * params.beta * (m_l.detach() - r_l)
        margins = chosen_rewards - rejected_rewards
        metrics.update(
            {
                "ref_mse/chosen": r_w.mean(),
                "ref_mse/rejected": r_l.mean(),
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": margins.mean(),
                "rewards/accuracies": (margins > 0).float().mean(),
            }
        )
    if lose_scale is not None:
        m_l = scale_gradient(m_l, lose_scale)
        metrics["winner_preserving/lambda"] = lose_scale.detach().float().mean()
    weights = None
    if noise_level is not None and timesteps_active(params):
        weights = timestep_weights(noise_level, params).to(m_w.device)
        metrics["timesteps/masked"] = (weights == 0).float().mean()
    if label is not None and params.soft_labels != "none":
        label = label.to(device=m_w.device, dtype=m_w.dtype)
        metrics["labels/mean"] = label.detach().mean()
    else:
        label = None
    total = policy_mse.new_zeros(())
    for name, weight in loss_types:
        extra = {"label": label} if label is not None and LOSSES[name].soft_labels else {}
        per_pair = LOSSES[name].fn(m_w, m_l, r_w, r_l, params, **extra)
        total = total + weight * (per_pair if weights is None else weights * per_pair).mean()
    return total, metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the selected entries; NaN when none is selected, so metric averaging can skip it."""
    return values[mask].mean() if bool(mask.any()) else values.new_tensor(float("nan"))


def compute_unpaired_loss(
    loss_types: list[tuple[str, float]],
    policy_mse: torch.Tensor,
    ref_mse: torch.Tensor,
    desirable: torch.Tensor,
    params: LossParams,
    global_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the batch-mean losses on unpaired images, and metrics named like TRL's KTOTrainer.

    `policy_mse`, `ref_mse` and the boolean `desirable` have one entry per image. `global_mean` averages a tensor over
    the batch of every process (the trainer passes a gathering mean); it sets the KTO reference point.
    """
    desirable = desirable.to(device=policy_mse.device, dtype=torch.bool)
    ref_mse = ref_mse.detach()
    g = ref_mse - policy_mse.detach()
    z0 = kto_reference_point(g, global_mean)
    rewards = params.beta * g
    undesirable = ~desirable
    metrics = {
        "kto/reference_point": z0,
        "rewards/chosen": _masked_mean(rewards, desirable),
        "rewards/rejected": _masked_mean(rewards, undesirable),
        "mse/chosen": _masked_mean(policy_mse.detach(), desirable),
        "mse/rejected": _masked_mean(policy_mse.detach(), undesirable),
        "ref_mse/chosen": _masked_mean(ref_mse, desirable),
        "ref_mse/rejected": _masked_mean(ref_mse, undesirable),
    }
    total = policy_mse.new_zeros(())
    for name, weight in loss_types:
        total = total + weight * LOSSES[name].fn(policy_mse, ref_mse, desirable, z0, params).mean()
    return total, metrics


# ----- on-policy losses: GRPO on per-step log-densities (sde.py), DiffusionNFT on forward-process predictions ---------
def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 1e-4,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    kl_std: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped-ratio GRPO loss of one sampler step, as flow_grpo's scripts/train_sd3.py:881-897 (ac4c86e).

    ratio = exp(log_prob - old_log_prob) per sample (`log_prob` averaged over latent elements, sde.py), the loss
    mean_b max(-A ratio, -A clip(ratio, 1 - epsilon, 1 + epsilon_high)) plus, with beta > 0, beta times the KL of the
    step to the reference's, mean_b [ mean over latent elements of (mean - ref_mean)^2 / (2 kl_std^2) ]. flow_grpo
    divides by the Flow-SDE's noise scale s squared (`sde.flow_sde_noise_scale`; eta for DanceGRPO's step), not by
    the transition variance s^2 |dt|; for CPS and DDIM pass the step's `std`.

    Metrics: `clip_ratio/{low,high,region}_mean` as TRL counts them (the clip binds: ratio below 1 - epsilon with
    A < 0, above 1 + epsilon_high with A > 0), flow_grpo's `clipfrac` (|ratio - 1| > epsilon, any sign) and
    `approx_kl` (0.5 mean (log_prob - old_log_prob)^2), `importance_ratio/mean` (exactly 1 on fresh samples; below 1
    is the bf16 bias of flow_grpo #204), `policy_loss`, and `kl` when a reference mean is given.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    advantages = advantages.to(log_prob.dtype)
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    ratio_d = ratio.detach()
    low = (ratio_d < 1.0 - epsilon) & (advantages < 0)
    high = (ratio_d > 1.0 + epsilon_high) & (advantages > 0)
    metrics = {
        "policy_loss": policy_loss.detach(),
        "importance_ratio/mean": ratio_d.mean(),
        "clip_ratio/low_mean": low.float().mean(),
        "clip_ratio/high_mean": high.float().mean(),
        "clip_ratio/region_mean": (low | high).float().mean(),
        "clipfrac": ((ratio_d - 1.0).abs() > epsilon).float().mean(),
        "approx_kl": 0.5 * ((log_prob.detach() - old_log_prob.detach()) ** 2).mean(),
    }
    loss = policy_loss
    if beta > 0 and (ref_mean is None or mean is None or kl_std is None):
        raise ValueError(f"beta={beta} needs the step's `mean`, the reference's `ref_mean` and `kl_std` for the KL.")
    if ref_mean is not None and mean is not None and kl_std is not None:
        kl = ((mean - ref_mean.detach()) ** 2 / (2 * kl_std**2)).flatten(1).mean(dim=1).mean()
        metrics["kl"] = kl.detach()
        if beta > 0:
            loss = loss + beta * kl
    return loss, metrics


def nft_loss(
    x0_pred: torch.Tensor,
    old_x0_pred: torch.Tensor,
    x0: torch.Tensor,
    optimality: torch.Tensor,
    nft_beta: float = 1.0,
    loss_scale: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's policy loss (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT scripts/train_nft_sd3.py:934-960
    at 24af555) on clean-sample estimates at one noisy x_t of the rollout's clean latents `x0`.

    The implicit positive and negative policies mix the policy's and the old policy's predictions,
    v+ = nft_beta v + (1 - nft_beta) v_old and v- = (1 + nft_beta) v_old - nft_beta v. The clean-sample estimate is
    affine in the prediction with coefficients summing to one (flow: x0_hat = x_t - t v; epsilon:
    (x_t - sqrt(1 - a) eps) / sqrt(a); v-prediction: sqrt(a) x_t - sqrt(1 - a) v), so x0_hat(v+) =
    nft_beta x0_pred + (1 - nft_beta) old_x0_pred for every parametrisation: this x0 form is the official flow loss
    and, unchanged, the epsilon- and v-prediction one (derived here: the official code trains only SD3.5, a flow). Per sample, with the adaptive weight w = mean |x0_hat - x0|
    (detached, at least 1e-5) and r the optimality weight (advantages.nft_optimality),

        loss = loss_scale * mean_b [ r mean((x0_hat+ - x0)^2) / w+ + (1 - r) mean((x0_hat- - x0)^2) / w- ] / nft_beta

    `loss_scale` is the official code's factor, its `adv_clip_max` (5). The KL-like regulariser to the base model is
    `prediction_kl`, added with its own weight. With the policy equal to the old policy and r = 0.5 the two terms'
    gradients cancel exactly.
    """
    old_x0_pred = old_x0_pred.detach()
    r = optimality.to(x0_pred.dtype).reshape(-1)
    dims = tuple(range(1, x0.ndim))

    def weighted_error(estimate):
        with torch.no_grad():
            weight = (estimate.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
        return ((estimate - x0) ** 2 / weight.to(estimate.dtype)).mean(dim=dims)

    positive = weighted_error(nft_beta * x0_pred + (1 - nft_beta) * old_x0_pred)
    negative = weighted_error((1 + nft_beta) * old_x0_pred - nft_beta * x0_pred)
    per_sample = (r * positive + (1 - r) * negative) / nft_beta
    loss = (per_sample * loss_scale).mean()
    metrics = {
        "policy_loss": loss.detach(),
        "nft/positive_loss": positive.detach().mean(),
        "nft/negative_loss": negative.detach().mean(),
        "nft/old_deviation": ((x0_pred.detach() - old_x0_pred) ** 2).mean(),
        "nft/optimality_mean": r.detach().mean(),
    }
    return loss, metrics


def prediction_kl(prediction: torch.Tensor, ref_prediction: torch.Tensor) -> torch.Tensor:
    """DiffusionNFT's KL-like regulariser: mean over samples of the per-sample mean squared gap between the policy's
    and the base model's raw predictions (train_nft_sd3.py:966-970; weight `train.beta`, 1e-4)."""
    return ((prediction - ref_prediction.detach()) ** 2).flatten(1).mean(dim=1).mean()
