"""Group-relative advantages against hand computations with `statistics`, TRL's semantics for several reward
functions and None rewards, the split over processes, and DiffusionNFT's optimality weight."""

import math
import statistics

import pytest
import torch

from diffusion_dpo_trainer.advantages import compute_advantages, nft_optimality

# Two groups of 3: a spread group and a group whose rewards are all equal.
REWARDS = [1.0, 2.0, 4.0, 3.0, 3.0, 3.0]


def hand_group(rewards, G, scale):
    """(r - group mean) / (std + 1e-4), with the sample (Bessel) std per group or over the batch, by `statistics`."""
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        mean = statistics.fmean(group)
        std = {"group": statistics.stdev(group), "batch": statistics.stdev(rewards), "none": None}[scale]
        out += [(r - mean) / (std + 1e-4) if std is not None else r - mean for r in group]
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_by_hand(scale):
    result = compute_advantages(torch.tensor(REWARDS), 3, scale_rewards=scale)
    assert result.advantages.tolist() == pytest.approx(hand_group(REWARDS, 3, scale), abs=1e-6)
    assert result.frac_reward_zero_std.item() == 0.5  # the second group carries no signal, in every mode
    assert result.rewards.tolist() == REWARDS


def test_trls_booleans_and_clipping():
    group = compute_advantages(torch.tensor(REWARDS), 3, scale_rewards=True)
    assert torch.equal(group.advantages, compute_advantages(torch.tensor(REWARDS), 3).advantages)
    rewards = torch.tensor([0.0, 0.0, 0.0, 10.0] * 2)  # one outlier per group: advantage (10-2.5)/5 = 1.5
    clipped = compute_advantages(rewards, 4, scale_rewards="none", advantage_clip=2.0).advantages
    assert clipped.tolist() == pytest.approx([-2.0, -2.0, -2.0, 2.0] * 2)  # -2.5 and 7.5 clipped to [-2, 2]


def test_sum_then_normalize_weights_and_none_rewards_as_trl():
    nan = float("nan")
    per_func = torch.tensor([[1.0, 0.0], [2.0, nan], [3.0, 1.0], [nan, nan]])  # the last sample: no function scored it
    result = compute_advantages(per_func, 4, reward_weights=[1.0, 2.0])
    summed = [1.0, 2.0, 5.0]  # None counts as 0 in the weighted sum (nansum), unless every function returned None
    mean, std = statistics.fmean(summed), statistics.stdev(summed)
    expected = [(r - mean) / (std + 1e-4) for r in summed] + [0.0]
    assert result.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(result.rewards[3].item())


def test_normalize_then_sum_as_trl():
    per_func = torch.tensor([[1.0, 10.0], [2.0, 30.0], [0.0, 5.0], [4.0, 5.0]])
    result = compute_advantages(per_func, 2, reward_weights=[1.0, 0.5],
                                multi_objective_aggregation="normalize_then_sum", scale_rewards="none")
    total = []
    for g in (0, 2):  # each function normalised within its group, then weighted and summed
        a = [per_func[g + i, 0].item() for i in range(2)]
        b = [per_func[g + i, 1].item() for i in range(2)]
        norm = lambda xs, x: (x - statistics.fmean(xs)) / (statistics.stdev(xs) + 1e-4)
        total += [norm(a, a[i]) + 0.5 * norm(b, b[i]) for i in range(2)]
    mean, std = statistics.fmean(total), statistics.stdev(total)  # then normalised over the batch
    assert result.advantages.tolist() == pytest.approx([(t - mean) / (std + 1e-4) for t in total], abs=1e-5)
    # the second function has no spread in group 2: its normalised reward is 0 there, not a division by ~0
    assert result.rewards[2].item() == pytest.approx(norm([0.0, 4.0], 0.0), abs=1e-6)


def test_gathered_rewards_give_every_process_the_one_process_advantages():
    """Two processes of 6 samples, groups of 4: group 2 straddles them. Each process passes the gathered rewards and
    keeps its slice; normalising each process's own rewards (the bug) gives other numbers."""
    rewards = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.2, 0.8, 0.4, 0.7, 0.6, 0.1, 0.3])
    one_process = compute_advantages(rewards, 4).advantages
    local = rewards.view(2, 6)
    gathered = torch.cat(list(local))
    for rank in range(2):
        mine = compute_advantages(gathered, 4).advantages[rank * 6:(rank + 1) * 6]
        assert torch.equal(mine, one_process[rank * 6:(rank + 1) * 6])
    with pytest.raises(ValueError, match="not whole groups"):
        compute_advantages(local[0], 4)  # a process alone does not even hold whole groups


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_generations=1"):
        compute_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="reward function 1 returned inf for sample 2"):
        compute_advantages(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, float("inf")], [3.0, 1.0]]), 2)
    with pytest.raises(ValueError, match="1 reward_weights for 2"):
        compute_advantages(torch.zeros(4, 2), 2, reward_weights=[1.0])
    with pytest.raises(ValueError, match="scale_rewards='prompt'"):
        compute_advantages(torch.zeros(4), 2, scale_rewards="prompt")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        compute_advantages(torch.zeros(4), 2, multi_objective_aggregation="mean")


def test_nft_optimality_clips_and_maps_affinely():
    advantages = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 9.0])
    assert nft_optimality(advantages, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="advantage_clip=0"):
        nft_optimality(advantages, 0)
