"""GRPO's clipped-ratio loss and KL and DiffusionNFT's loss against hand computations on fixed tensors, the gradient
balance NFT's derivation promises, and the NFT old policy's EMA schedule."""

import math

import pytest
import torch

from diffusion_dpo_trainer import losses
from diffusion_dpo_trainer.old_policy import NFT_DECAY_PRESETS, ema_update_, nft_ema_decay

# ----- GRPO -----------------------------------------------------------------------------------------------------------
OLD = [-1.0, -1.0, -1.0, -1.0]
NEW = [-1.0 + math.log(1.5), -1.0 + math.log(0.5), -1.0 + math.log(1.01), -1.0 + math.log(0.999)]
ADV = [1.0, -2.0, 0.5, 3.0]


def hand_grpo(new, old, adv, eps, eps_high=None):
    eps_high = eps if eps_high is None else eps_high
    losses_, low, high = [], [], []
    for lp, lo, a in zip(new, old, adv):
        ratio = math.exp(lp - lo)
        clipped = min(max(ratio, 1 - eps), 1 + eps_high)
        losses_.append(max(-a * ratio, -a * clipped))
        low.append(ratio < 1 - eps and a < 0)
        high.append(ratio > 1 + eps_high and a > 0)
    return sum(losses_) / len(losses_), sum(low) / len(low), sum(high) / len(high)


def grpo(new=NEW, old=OLD, adv=ADV, **kw):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    return losses.grpo_loss(t(new), t(old), t(adv), **kw)


def test_grpo_clipped_ratio_loss_by_hand():
    loss, metrics = grpo(epsilon=0.2)
    expected, low, high = hand_grpo(NEW, OLD, ADV, 0.2)
    # ratio 1.5 with A > 0 is clipped at 1.2; ratio 0.5 with A < 0 is clipped at 0.8: both bind (TRL's counts)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    clip_low, clip_high = metrics["clip_ratio/low_mean"].item(), metrics["clip_ratio/high_mean"].item()
    assert (clip_low, clip_high) == (low, high) == (0.25, 0.25)
    assert metrics["clip_ratio/region_mean"].item() == 0.5
    assert metrics["clipfrac"].item() == 0.5  # flow_grpo: |ratio - 1| > eps, whatever the sign of A
    assert metrics["importance_ratio/mean"].item() == pytest.approx((1.5 + 0.5 + 1.01 + 0.999) / 4)
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * sum((n - o) ** 2 for n, o in zip(NEW, OLD)) / 4)


def test_grpo_asymmetric_clip_range():
    loss, metrics = grpo(epsilon=0.2, epsilon_high=0.6)  # ratio 1.5 with A > 0 is now inside the range
    assert loss.item() == pytest.approx(hand_grpo(NEW, OLD, ADV, 0.2, 0.6)[0], abs=1e-12)
    assert loss.item() != pytest.approx(hand_grpo(NEW, OLD, ADV, 0.2)[0], abs=1e-3)
    assert metrics["clip_ratio/high_mean"].item() == 0.0 and metrics["clip_ratio/low_mean"].item() == 0.25


def test_grpo_published_epsilon_clips_ratios_of_one_percent():
    loss, metrics = grpo(epsilon=1e-4)
    assert loss.item() == pytest.approx(hand_grpo(NEW, OLD, ADV, 1e-4)[0], abs=1e-12)
    assert metrics["clipfrac"].item() == 1.0


def test_grpo_ratio_is_exactly_one_on_fresh_samples_and_the_gradient_is_the_advantage():
    log_prob = torch.tensor([-3.2, -0.7, -1.9], requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    loss, metrics = losses.grpo_loss(log_prob, log_prob.detach().clone(), advantages)
    assert metrics["importance_ratio/mean"].item() == 1.0 and metrics["clipfrac"].item() == 0.0
    loss.backward()
    assert torch.allclose(log_prob.grad, -advantages / 3)  # d/dlogp of -A * exp(logp - logp_old) at ratio 1


def test_grpo_kl_to_reference_as_flow_grpo_reduces_it():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    kl_std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    lp = torch.zeros(2, dtype=torch.float32)
    loss, metrics = losses.grpo_loss(lp, lp, torch.tensor([1.0, -1.0]), beta=0.04, mean=mean, ref_mean=ref,
                                     kl_std=kl_std)
    per_sample = [((mean[b] - ref[b]) ** 2).mean().item() / (2 * kl_std[b].item() ** 2) for b in range(2)]
    kl = sum(per_sample) / 2  # mean over latent elements per sample, / (2 s^2), then over samples
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.0 + 0.04 * kl, rel=1e-6)  # policy term: -(A * 1) averaged = 0
    with pytest.raises(ValueError, match="beta=0.04 needs"):
        losses.grpo_loss(lp, lp, torch.ones(2), beta=0.04)


# ----- DiffusionNFT ---------------------------------------------------------------------------------------------------
def nft_fixture():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 3, 3, generator=g)
    noise = torch.randn(3, 2, 3, 3, generator=g)
    t = torch.tensor([0.3, 0.6, 0.9]).view(3, 1, 1, 1)
    x_t = (1 - t) * x0 + t * noise
    v = noise - x0 + 0.3 * torch.randn(3, 2, 3, 3, generator=g)
    v_old = v + 0.2 * torch.randn(3, 2, 3, 3, generator=g)
    return x0, x_t, t, v, v_old


def transcribed_nft(x0, x_t, t, v, v_old, r, beta, c):
    """The official loss, transcribed in velocity form: x0_hat(v) = x_t - t v for v+ and v-, adaptive weights."""
    total = 0.0
    for b in range(x0.shape[0]):
        v_pos = beta * v[b] + (1 - beta) * v_old[b]
        v_neg = (1 + beta) * v_old[b] - beta * v[b]
        e_pos, e_neg = x_t[b] - t[b] * v_pos - x0[b], x_t[b] - t[b] * v_neg - x0[b]
        pos = (e_pos**2 / e_pos.abs().mean()).mean().item()
        neg = (e_neg**2 / e_neg.abs().mean()).mean().item()
        total += c * (r[b] * pos / beta + (1 - r[b]) * neg / beta)
    return total / x0.shape[0]


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_is_the_official_velocity_form(beta):
    x0, x_t, t, v, v_old = nft_fixture()
    r = [0.9, 0.2, 0.5]
    loss, metrics = losses.nft_loss(x_t - t * v, x_t - t * v_old, x0, torch.tensor(r), nft_beta=beta, loss_scale=5.0)
    assert loss.item() == pytest.approx(transcribed_nft(x0, x_t, t, v, v_old, r, beta, 5.0), rel=1e-5)
    assert metrics["nft/optimality_mean"].item() == pytest.approx(sum(r) / 3)


def test_nft_gradient_with_policy_equal_to_old_policy_by_hand():
    """At v = v_old both implicit policies are v itself and w+ = w- = w = mean|e|, e = x0_hat - x0. The positive term's
    gradient in x0_hat is 2 c r e / (w D B), the negative term's -2 c (1 - r) e / (w D B) (nft_beta cancels): their
    sum is (2r - 1) 2 c e / (w D B), zero at r = 0.5 whatever the error."""
    x0, x_t, t, v, _ = (tensor.double() for tensor in nft_fixture())
    c, B, D = 5.0, x0.shape[0], x0[0].numel()
    for r in ([0.5, 0.5, 0.5], [1.0, 0.0, 0.8]):
        x0_pred = (x_t - t * v).requires_grad_(True)
        optimality = torch.tensor(r, dtype=torch.float64)
        loss, _ = losses.nft_loss(x0_pred, x0_pred.detach().clone(), x0, optimality, nft_beta=0.7, loss_scale=c)
        loss.backward()
        e = (x0_pred - x0).detach()
        w = e.abs().flatten(1).mean(1).view(B, 1, 1, 1)
        expected = (2 * torch.tensor(r, dtype=torch.float64).view(B, 1, 1, 1) - 1) * 2 * c * e / (w * D * B)
        torch.testing.assert_close(x0_pred.grad, expected, rtol=1e-9, atol=1e-12)
    assert x0_pred.grad[2].abs().max() > 0  # r = 0.8: a real pull, not a vanishing gradient everywhere


def test_prediction_kl_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert losses.prediction_kl(pred, ref).item() == pytest.approx(((1 + 4) / 2 + (0 + 4) / 2) / 2)


# ----- the NFT old policy ---------------------------------------------------------------------------------------------
def test_nft_decay_schedules_by_hand():
    flat, uprate, uphold = NFT_DECAY_PRESETS[1]
    assert [nft_ema_decay(s, flat, uprate, uphold) for s in (0, 1, 250, 499, 500, 10_000)] == \
        pytest.approx([0.0, 0.001, 0.25, 0.499, 0.5, 0.5])
    flat, uprate, uphold = NFT_DECAY_PRESETS[2]
    assert [nft_ema_decay(s, flat, uprate, uphold) for s in (0, 74, 75, 76, 175, 300)] == \
        pytest.approx([0.0, 0.0, 0.0, 0.0075, 0.75, 0.999])
    assert nft_ema_decay(1000, *NFT_DECAY_PRESETS[0]) == 0.0


def test_ema_update_moves_the_old_policy_exactly():
    old, new = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])], [torch.tensor([3.0, 6.0]), torch.tensor([[4.0]])]
    ema_update_(old, new, 0.25)
    assert old[0].tolist() == [2.5, 5.0] and old[1].item() == 3.0  # 0.25 old + 0.75 new
    assert new[0].tolist() == [3.0, 6.0]  # the policy itself never moves
    with pytest.raises(ValueError, match="shares a tensor"):
        ema_update_(new, new, 0.5)
