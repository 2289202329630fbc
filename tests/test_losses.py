"""The loss family against numbers computed by hand with `math`, gradients, and properties that must always hold."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_dpo_trainer import losses
from diffusion_dpo_trainer.losses import LossParams


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(values) -> float:
    return sum(values) / len(values)


# Two pairs whose DPO logits differ a lot, so a batch mean taken inside the nonlinearity gives another number.
M_W, M_L = [0.30, 0.10], [0.20, 0.40]
R_W, R_L = [0.25, 0.12], [0.22, 0.41]


def paired(names, params, weights=None, ref=True):
    policy = torch.tensor(M_W + M_L, dtype=torch.float64)
    reference = torch.tensor(R_W + R_L, dtype=torch.float64) if ref else None
    loss_types = losses.resolve_loss_types(names, weights)
    loss, metrics = losses.compute_paired_loss(loss_types, policy, reference, params)
    return loss.item(), metrics


def hand_logits(beta):
    return [-beta / 2 * ((mw - rw) - (ml - rl)) for mw, ml, rw, rl in zip(M_W, M_L, R_W, R_L)]


def test_sigmoid_by_hand_and_not_the_batch_mean_inside_bug():
    z = hand_logits(20.0)  # [-0.7, 0.1]
    expected = mean([-logsigmoid(v) for v in z])
    mean_inside = -logsigmoid(mean(z))
    assert abs(expected - mean_inside) > 1e-2  # the case separates the two
    loss, metrics = paired("sigmoid", LossParams(beta=20.0))
    assert loss == pytest.approx(expected, abs=1e-12)
    chosen = [-10.0 * (mw - rw) for mw, rw in zip(M_W, R_W)]
    rejected = [-10.0 * (ml - rl) for ml, rl in zip(M_L, R_L)]
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(chosen))
    assert metrics["rewards/margins"].item() == pytest.approx(mean(chosen) - mean(rejected))
    assert metrics["rewards/accuracies"].item() == 0.5
    assert metrics["mse/margin"].item() == pytest.approx(mean(M_L) - mean(M_W))


def test_label_smoothing_by_hand():
    eps = 0.1
    expected = mean([-(1 - eps) * logsigmoid(v) - eps * logsigmoid(-v) for v in hand_logits(20.0)])
    assert paired("sigmoid", LossParams(beta=20.0, label_smoothing=eps))[0] == pytest.approx(expected, abs=1e-12)


def test_hinge_by_hand_with_one_pair_past_the_margin():
    z = hand_logits(400.0)  # [-14, 2]: the second pair is past the margin and contributes 0
    expected = mean([max(0.0, 1.0 - v) for v in z])
    assert expected == pytest.approx(7.5)
    assert paired("hinge", LossParams(beta=400.0))[0] == pytest.approx(expected, abs=1e-10)


def test_ipo_by_hand():
    beta = 20.0
    h = [(rw - mw) - (rl - ml) for mw, ml, rw, rl in zip(M_W, M_L, R_W, R_L)]  # unscaled margins [-0.07, 0.01]
    expected = mean([(v - 1 / (2 * beta)) ** 2 for v in h])
    assert paired("ipo", LossParams(beta=beta))[0] == pytest.approx(expected, abs=1e-12)


def test_sft_is_the_preferred_images_mse_and_needs_no_reference():
    loss, metrics = paired("sft", LossParams(), ref=False)
    assert loss == pytest.approx(mean(M_W), abs=1e-12)
    assert not any(k.startswith(("rewards/", "ref_mse/")) for k in metrics)
    assert metrics["mse/margin"].item() == pytest.approx(mean(M_L) - mean(M_W))


@pytest.mark.parametrize("gamma,temperature", [(0.5, 1000.0), (2.0, 10.0)])
def test_mapo_by_hand_without_reference(gamma, temperature):
    def s(m):
        return gamma * m / (math.exp(gamma * m) - 1)

    beta = 0.1
    expected = mean([mw - beta * logsigmoid(temperature * (s(mw) - s(ml))) for mw, ml in zip(M_W, M_L)])
    params = LossParams(mapo_beta=beta, mapo_gamma=gamma, mapo_temperature=temperature)
    assert paired("mapo", params, ref=False)[0] == pytest.approx(expected, rel=1e-10)


def test_mapo_log_odds_is_finite_at_zero_error():
    s = losses.mapo_log_odds(torch.tensor([0.0, 1e-30, 1.0, 500.0]), 0.5)
    assert torch.isfinite(s).all()
    assert s.tolist()[:2] == [1.0, 1.0] and s[2].item() == pytest.approx(0.5 / (math.exp(0.5) - 1))


def test_combination_by_hand():
    beta = 20.0
    expected = mean([-logsigmoid(v) for v in hand_logits(beta)]) + 0.2 * mean(M_W)
    assert paired(["sigmoid", "sft"], LossParams(beta=beta), [1.0, 0.2])[0] == pytest.approx(expected, abs=1e-12)


def test_per_sample_mse_then_loss_is_not_the_per_element_bug():
    """The loss is a function of per-sample errors averaged over latent elements, not averaged per element."""
    # One pair, 4 latent elements each, given as squared errors; the reference is exact (zero error).
    winner_sq = [0.0, 0.0, 0.0, 2.0]  # per-sample mse 0.5
    loser_sq = [1.0, 1.0, 1.0, 1.0]  # per-sample mse 1.0
    prediction = torch.tensor([winner_sq, loser_sq], dtype=torch.float64).sqrt().view(2, 1, 2, 2)
    policy = losses.per_sample_mse(prediction, torch.zeros_like(prediction))
    assert policy.tolist() == pytest.approx([0.5, 1.0])
    beta = 4.0
    expected = -logsigmoid(-beta / 2 * (mean(winner_sq) - mean(loser_sq)))
    per_element = mean([-logsigmoid(-beta / 2 * (w - l)) for w, l in zip(winner_sq, loser_sq)])
    assert abs(expected - per_element) > 0.1  # the per-element variant gives another number here
    loss, _ = losses.compute_paired_loss([("sigmoid", 1.0)], policy, torch.zeros(2), LossParams(beta=beta))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# ----- KTO ------------------------------------------------------------------------------------------------------------
KTO_M = [0.30, 0.10, 0.50, 0.20]
KTO_R = [0.32, 0.10, 0.45, 0.26]
KTO_DESIRABLE = [True, True, False, False]


def kto_by_hand(beta, lam_d, lam_u, z0=None):
    g = [r - m for m, r in zip(KTO_M, KTO_R)]
    z0 = max(mean(g), 0.0) if z0 is None else z0
    per_image = [
        (lam_d if d else lam_u) * (1 - sigmoid((1 if d else -1) * beta * (gi - z0))) for gi, d in zip(g, KTO_DESIRABLE)
    ]
    return mean(per_image), z0


def kto(params, policy=None, global_mean=torch.mean, m=KTO_M):
    policy = torch.tensor(m, dtype=torch.float64) if policy is None else policy
    return losses.compute_unpaired_loss(
        [("kto", 1.0)], policy, torch.tensor(KTO_R, dtype=torch.float64), torch.tensor(KTO_DESIRABLE), params,
        global_mean,
    )


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_each_loss_declares_exactly_the_hyper_parameters_it_reads(name):
    """The model card records LOSSES[name].params: a value the loss reads but does not declare would go unrecorded."""
    base = LossParams(beta=50.0, label_smoothing=0.1, mapo_beta=0.1, mapo_gamma=0.5, mapo_temperature=10.0)

    def loss_with(params):
        return kto(params)[0].item() if name == "kto" else paired(name, params)[0]

    for field in dataclasses.fields(LossParams):
        if field.name in losses.STABILISER_FIELDS:  # every paired loss's, checked in test_stabilisers.py
            continue
        perturbed = dataclasses.replace(base, **{field.name: getattr(base, field.name) * 1.5})
        assert (loss_with(perturbed) != loss_with(base)) == (field.name in losses.LOSSES[name].params), field.name


def test_loss_hyperparameters_lists_the_selected_losses_values_and_their_weights():
    params = LossParams(beta=2500.0, label_smoothing=0.1, mapo_gamma=2.0)
    assert losses.loss_hyperparameters([("sigmoid", 1.0)], params) == {"beta": 2500.0, "label_smoothing": 0.1}
    assert losses.loss_hyperparameters([("mapo", 1.0), ("sft", 0.5)], params) == {
        "mapo_beta": 0.1, "mapo_gamma": 2.0, "mapo_temperature": 1000.0, "loss_weights": [1.0, 0.5]}


def test_kto_by_hand():
    expected, z0 = kto_by_hand(50.0, 1.5, 0.5)
    assert z0 == pytest.approx(0.0075)
    loss, metrics = kto(LossParams(beta=50.0, kto_desirable_weight=1.5, kto_undesirable_weight=0.5))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["kto/reference_point"].item() == pytest.approx(z0)
    assert metrics["rewards/chosen"].item() == pytest.approx(50.0 * mean([0.02, 0.0]))
    assert metrics["rewards/rejected"].item() == pytest.approx(50.0 * mean([-0.05, 0.06]))
    assert metrics["mse/chosen"].item() == pytest.approx(mean(KTO_M[:2]))


def test_kto_reference_point_is_clamped_at_zero():
    worse = [m + 0.1 for m in KTO_M]  # every g negative: the reference point stays at 0
    _, metrics = kto(LossParams(beta=10.0), m=worse)
    assert metrics["kto/reference_point"].item() == 0.0


def test_kto_reference_point_uses_the_given_global_mean():
    """Across processes the trainer passes a gathering mean; the loss must use it, not the local mean."""
    expected, _ = kto_by_hand(50.0, 1.0, 1.0, z0=0.03)
    loss, metrics = kto(LossParams(beta=50.0), global_mean=lambda g: g.new_tensor(0.03))
    assert metrics["kto/reference_point"].item() == pytest.approx(0.03)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_kto_metrics_of_an_absent_group_are_nan_not_zero():
    loss, metrics = losses.compute_unpaired_loss(
        [("kto", 1.0)], torch.tensor([0.1, 0.2]), torch.tensor([0.1, 0.2]), torch.tensor([False, False]),
        LossParams(),
    )
    assert math.isnan(metrics["rewards/chosen"].item()) and not math.isnan(metrics["rewards/rejected"].item())
    assert loss.item() == pytest.approx(0.5)


# ----- gradients --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo"])
def test_no_gradient_reaches_the_reference(name):
    policy = torch.tensor(M_W + M_L, dtype=torch.float64, requires_grad=True)
    reference = torch.tensor(R_W + R_L, dtype=torch.float64, requires_grad=True)
    loss, _ = losses.compute_paired_loss([(name, 1.0)], policy, reference, LossParams(beta=20.0))
    loss.backward()
    assert reference.grad is None
    assert policy.grad.abs().sum() > 0


def test_sigmoid_gradient_by_hand():
    beta = 20.0
    policy = torch.tensor(M_W + M_L, dtype=torch.float64, requires_grad=True)
    loss, _ = losses.compute_paired_loss([("sigmoid", 1.0)], policy, torch.tensor(R_W + R_L, dtype=torch.float64),
                                         LossParams(beta=beta))
    loss.backward()
    # d/dm_w of mean(-logsigmoid(z)) = sigmoid(-z) * beta/2 / B, and the opposite for m_l.
    grad_w = [sigmoid(-v) * beta / 2 / 2 for v in hand_logits(beta)]
    assert policy.grad.tolist() == pytest.approx(grad_w + [-g for g in grad_w], abs=1e-12)


def test_sft_trains_only_the_preferred_image():
    policy = torch.tensor(M_W + M_L, dtype=torch.float64, requires_grad=True)
    loss, _ = losses.compute_paired_loss([("sft", 1.0)], policy, None, LossParams())
    loss.backward()
    assert policy.grad.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_mapo_gradient_reaches_winner_and_loser_without_a_reference():
    policy = torch.tensor(M_W + M_L, dtype=torch.float64, requires_grad=True)
    loss, _ = losses.compute_paired_loss([("mapo", 1.0)], policy, None, LossParams(mapo_temperature=10.0))
    loss.backward()
    assert (policy.grad[2:] != 0).all() and torch.isfinite(policy.grad).all()


def test_kto_reference_point_is_detached():
    beta, n = 50.0, len(KTO_M)
    policy = torch.tensor(KTO_M, dtype=torch.float64, requires_grad=True)
    loss, metrics = kto(LossParams(beta=beta), policy=policy)
    loss.backward()
    z0 = metrics["kto/reference_point"].item()
    assert z0 > 0  # the clamp is inactive, so an attached z0 would change every gradient
    expected = []
    for m, r, d in zip(KTO_M, KTO_R, KTO_DESIRABLE):
        sign = 1 if d else -1
        u = sign * beta * (r - m - z0)
        expected.append(sigmoid(u) * (1 - sigmoid(u)) * sign * beta / n)
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_a_reference_loss_without_reference_errors_is_refused():
    with pytest.raises(ValueError, match="needs the reference"):
        paired("sigmoid", LossParams(), ref=False)


# ----- resolving loss types ---------------------------------------------------------------------------------------
def test_unknown_loss_type_lists_every_valid_name():
    with pytest.raises(ValueError, match="Unknown loss_type") as info:
        losses.resolve_loss_types(["sigmoid", "orpo"])
    for name in ("sigmoid", "hinge", "ipo", "sft", "kto", "mapo"):
        assert name in str(info.value)


def test_mixing_paired_and_unpaired_losses_is_refused():
    with pytest.raises(ValueError, match=r"mixes losses for paired data.*unpaired data"):
        losses.resolve_loss_types(["sigmoid", "kto"])


@pytest.mark.parametrize(
    "loss_type,weights,match",
    [("sigmoid", [1.0, 2.0], "has 2 entries"), (["sigmoid", "sft"], [1.0, -1.0], "non-negative"),
     (["sft", "sft"], None, "twice"), ([], None, "empty")],
)
def test_bad_weights_and_lists_are_refused(loss_type, weights, match):
    with pytest.raises(ValueError, match=match):
        losses.resolve_loss_types(loss_type, weights)


@pytest.mark.parametrize("field,value", [("label_smoothing", 0.7), ("beta", 0.0), ("mapo_temperature", -1.0),
                                         ("kto_desirable_weight", -1.0)])
def test_out_of_range_hyper_parameters_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        LossParams(**{field: value})


# ----- properties -------------------------------------------------------------------------------------------------
errors = st.lists(st.floats(0.0, 100.0, width=32), min_size=4, max_size=4)
betas = st.floats(1e-2, 1e5)


def as_pair(values):
    return [torch.tensor([v], dtype=torch.float32) for v in values]


@settings(max_examples=60, deadline=None)
@given(errors, betas, st.floats(0.0, 0.5))
def test_every_paired_loss_is_finite_for_finite_errors(values, beta, eps):
    m_w, m_l, r_w, r_l = as_pair(values)
    params = LossParams(beta=beta, label_smoothing=eps)
    for name, spec in losses.LOSSES.items():
        if spec.paired:
            out = spec.fn(m_w, m_l, r_w, r_l, params)
            assert torch.isfinite(out).all(), name


@settings(max_examples=60, deadline=None)
@given(errors, betas, st.lists(st.booleans(), min_size=2, max_size=2))
def test_kto_is_finite_for_finite_errors(values, beta, labels):
    m = torch.tensor(values[:2])
    r = torch.tensor(values[2:])
    loss, metrics = losses.compute_unpaired_loss([("kto", 1.0)], m, r, torch.tensor(labels), LossParams(beta=beta))
    assert math.isfinite(loss.item()) and math.isfinite(metrics["kto/reference_point"].item())


@settings(max_examples=60, deadline=None)
@given(errors, betas)
def test_swapping_winner_and_loser_negates_the_logit(values, beta):
    m_w, m_l, r_w, r_l = (torch.tensor([v], dtype=torch.float64) for v in values)
    z = losses.dpo_logits(m_w, m_l, r_w, r_l, beta)
    assert torch.allclose(losses.dpo_logits(m_l, m_w, r_l, r_w, beta), -z)
    # and hence -logsigmoid(-z) - -logsigmoid(z) = z: the sigmoid loss of the swapped pair is larger by z
    params = LossParams(beta=beta)
    swapped = losses.sigmoid_loss(m_l, m_w, r_l, r_w, params) - losses.sigmoid_loss(m_w, m_l, r_w, r_l, params)
    assert torch.allclose(swapped, z, rtol=1e-9, atol=1e-9 * (1 + z.abs().item()))


@settings(max_examples=60, deadline=None)
@given(errors, betas)
def test_no_label_smoothing_is_plain_dpo(values, beta):
    m_w, m_l, r_w, r_l = (torch.tensor([v], dtype=torch.float64) for v in values)
    plain = -torch.nn.functional.logsigmoid(losses.dpo_logits(m_w, m_l, r_w, r_l, beta))
    assert torch.equal(losses.sigmoid_loss(m_w, m_l, r_w, r_l, LossParams(beta=beta, label_smoothing=0.0)), plain)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0), min_size=8, max_size=8),
    st.lists(st.floats(0.0, 5.0), min_size=5, max_size=5),
)
def test_weighted_combination_is_the_weighted_sum(values, weights):
    policy = torch.tensor(values[:4], dtype=torch.float64)
    reference = torch.tensor(values[4:], dtype=torch.float64)
    names = ["sigmoid", "hinge", "ipo", "sft", "mapo"]
    params = LossParams(beta=3.0, mapo_temperature=5.0)
    combined, _ = losses.compute_paired_loss(list(zip(names, weights)), policy, reference, params)
    singles = [losses.compute_paired_loss([(n, 1.0)], policy, reference, params)[0] for n in names]
    expected = sum(w * s for w, s in zip(weights, singles))
    assert combined.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-9)
