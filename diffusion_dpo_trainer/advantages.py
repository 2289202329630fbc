"""Group-relative advantages from the rewards of the whole (gathered) batch, as TRL's GRPOTrainer forms them, and
DiffusionNFT's optimality weight.

Pure functions of the GLOBAL rewards: every process passes the same gathered tensor and keeps its own slice, so the
group statistics never depend on how a batch was split over processes (a group may straddle two of them). Rows of one
group are contiguous (TRL's `RepeatSampler` layout): rows `[g*G, (g+1)*G)` are the G samples of prompt g.

Sources: TRL `trl/trainer/grpo_trainer.py` (`_generate_and_score_completions`, lines 2676-2750 at f2cd577) and
`trl/trainer/utils.py:857` (`nanstd`); DiffusionNFT `scripts/train_nft_sd3.py:910-929` (24af555).
"""

from typing import NamedTuple

import torch

SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
STD_EPSILON = 1e-4  # TRL and flow_grpo: advantages = (r - mean) / (std + 1e-4)


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (N,) float32; 0 for a sample no reward function could score
    rewards: torch.Tensor  # (N,) the aggregated reward (NaN where unscorable): what is logged as `reward`
    frac_reward_zero_std: torch.Tensor  # share of groups whose aggregated rewards are all equal: no signal


def nanstd(values: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (TRL's `nanstd`); NaN where fewer than two values."""
    dims = dim if dim is not None else tuple(range(values.ndim))
    mean = torch.nanmean(values, dim=dims, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dims, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dims, keepdim=True) * count / (count - 1)
    std = torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def _check(rewards: torch.Tensor, num_generations: int, reward_weights) -> torch.Tensor:
    if num_generations < 2:
        raise ValueError(f"num_generations={num_generations}: a group needs at least 2 samples to have a spread.")
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    if rewards.ndim != 2:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected (num_samples,) or "
                         "(num_samples, num_reward_functions).")
    if rewards.shape[0] % num_generations:
        raise ValueError(f"{rewards.shape[0]} rewards are not whole groups of num_generations={num_generations}.")
    infinite = torch.isinf(rewards).nonzero()
    if len(infinite):
        row, column = infinite[0].tolist()
        raise ValueError(f"reward function {column} returned {rewards[row, column].item()} for sample {row}: expected "
                         "a finite float (or None when it cannot score the sample).")
    if reward_weights is not None and len(reward_weights) != rewards.shape[1]:
        raise ValueError(f"{len(reward_weights)} reward_weights for {rewards.shape[1]} reward functions.")
    return rewards


def compute_advantages(rewards, num_generations: int, *, reward_weights=None, scale_rewards="group",
                       multi_objective_aggregation: str = "sum_then_normalize",
                       advantage_clip: float | None = None) -> Advantages:
    """Advantages of the gathered rewards `(N,)` or `(N, K)` for K reward functions (NaN where a function returned
    None), exactly as TRL's GRPOTrainer:

    - "sum_then_normalize": r = sum_k w_k R_k (NaNs skipped), A = (r - group mean) / (std + 1e-4), the std per group
      ("group"), over the batch ("batch") or no division ("none"; Dr. GRPO). flow_grpo's `global_std=True` is "batch".
    - "normalize_then_sum" (GDPO): each function normalised within its group, weighted and summed, then the sum
      normalised over the batch; `scale_rewards` is not used, as in TRL.

    A sample no function could score gets advantage 0. The std is Bessel-corrected (TRL); flow_grpo's numpy std is
    not, a factor sqrt((G-1)/G) on group std. `advantage_clip` clamps to [-c, c] (flow_grpo's `adv_clip_max`, 5).
    `frac_reward_zero_std` is the share of groups with no reward spread, in every mode (TRL reports the batch's in
    "batch" mode, which is almost never zero).
    """
    if isinstance(scale_rewards, bool):  # TRL accepts True / False for "group" / "none"
        scale_rewards = "group" if scale_rewards else "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}.")
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation={multi_objective_aggregation!r}: expected one of "
                         f"{MULTI_OBJECTIVE_AGGREGATIONS}.")
    rewards = _check(torch.as_tensor(rewards, dtype=torch.float64), num_generations, reward_weights)
    weights = torch.ones(rewards.shape[1], dtype=torch.float64) if reward_weights is None else \
        torch.as_tensor(reward_weights, dtype=torch.float64)
    weights = weights.to(rewards.device)
    unscorable = torch.isnan(rewards).all(dim=1)
    G = num_generations

    if multi_objective_aggregation == "sum_then_normalize":
        total = (rewards * weights).nansum(dim=1)
        total[unscorable] = float("nan")
        grouped = total.view(-1, G)
        group_std = nanstd(grouped, dim=1)
        advantages = total - torch.nanmean(grouped, dim=1).repeat_interleave(G)
        if scale_rewards == "group":
            advantages = advantages / (group_std.repeat_interleave(G) + STD_EPSILON)
        elif scale_rewards == "batch":
            advantages = advantages / (nanstd(total) + STD_EPSILON)
    else:
        grouped = rewards.view(-1, G, rewards.shape[1])
        normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
            nanstd(grouped, dim=1, keepdim=True) + STD_EPSILON)
        total = (normalised.view(-1, rewards.shape[1]) * weights).nansum(dim=1)
        total[unscorable] = float("nan")
        group_std = nanstd(total.view(-1, G), dim=1)
        advantages = (total - torch.nanmean(total)) / (nanstd(total) + STD_EPSILON)

    advantages = torch.nan_to_num(advantages, nan=0.0)
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    zero_std = torch.isclose(torch.nan_to_num(group_std, nan=0.0), torch.zeros_like(group_std))
    return Advantages(advantages.float(), total.float(), zero_std.float().mean())


def nft_optimality(advantages: torch.Tensor, advantage_clip: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality weight r in [0, 1]: the advantage clipped to [-c, c] and mapped affinely,
    r = 0.5 + 0.5 * clip(A, -c, c) / c (train_nft_sd3.py:910-929; c = `adv_clip_max`, 5). r = 1 trains fully towards
    the implicit positive policy, r = 0 fully away (towards the negative), r = 0.5 is neutral."""
    if advantage_clip <= 0:
        raise ValueError(f"advantage_clip={advantage_clip} must be positive.")
    clipped = advantages.clamp(-advantage_clip, advantage_clip)
    return (clipped / advantage_clip / 2.0 + 0.5).clamp(0, 1)
