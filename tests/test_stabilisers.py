"""The stabilisers of offline DPO (winner-preserving safeguard, soft labels, timestep mask and weights, curriculum):
formulas against hand computations, then a few short runs on the tiny SD pipeline with LoRA, a full fine-tune,
caching, `precompute_ref_errors` and a resumed curriculum."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import LN2, lora, losses_of, make_args

from diffusion_dpo_trainer import DiffusionDPOTrainer, losses
from diffusion_dpo_trainer.curriculum import CurriculumSampler
from diffusion_dpo_trainer.formats import prepare_preference_dataset, with_soft_labels
from diffusion_dpo_trainer.losses import LossParams


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# Two pairs; the same numbers as test_losses.py, whose DPO logits at beta 20 are [-0.7, 0.1].
M_W, M_L = [0.30, 0.10], [0.20, 0.40]
R_W, R_L = [0.25, 0.12], [0.22, 0.41]
Z = [-0.7, 0.1]


def paired(names, params, **stabilisers):
    policy = torch.tensor(M_W + M_L, dtype=torch.float64, requires_grad=True)
    loss, metrics = losses.compute_paired_loss(losses.resolve_loss_types(names), policy,
                                               torch.tensor(R_W + R_L, dtype=torch.float64), params, **stabilisers)
    return loss, metrics, policy


# ----- winner-preserving safeguard (Diffusion-SDPO) ---------------------------------------------------------------
def lambda_by_autograd(pred_w, pred_l, target_w, target_l, mu):
    """A separate transcription of the reference code: output-space gradients of the two batch mse's by autograd."""
    pred_w, pred_l = pred_w.clone().requires_grad_(True), pred_l.clone().requires_grad_(True)
    g_w = torch.autograd.grad((pred_w - target_w).pow(2).mean(), pred_w)[0]
    g_l = torch.autograd.grad((pred_l - target_l).pow(2).mean(), pred_l)[0]
    dot = (g_l * g_w).sum().item()
    return 1.0 if dot <= 0 else min(max((1 - mu) * g_w.pow(2).sum().item() / dot, 0.0), 1.0)


@pytest.mark.parametrize("mu", [0.0, 0.6, 0.9, 1.0])
def test_winner_preserving_lambda_by_hand(mu):
    e_w = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    e_l = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    # sum e_w^2 = 6, sum e_w * e_l = 3 + 2 + 0 + 2 = 7: lambda = (1 - mu) * 6/7
    assert losses.winner_preserving_lambda(e_w, e_l, mu).item() == pytest.approx((1 - mu) * 6 / 7)
    target = torch.zeros_like(e_w)
    assert losses.winner_preserving_lambda(e_w, e_l, mu).item() == pytest.approx(
        lambda_by_autograd(e_w, e_l, target, target, mu))


def test_winner_preserving_lambda_is_one_without_conflict_and_capped_at_one():
    e_w = torch.tensor([[1.0, 0.0]])
    assert losses.winner_preserving_lambda(e_w, torch.tensor([[-1.0, 5.0]]), 0.5).item() == 1.0  # g_l . g_w < 0
    assert losses.winner_preserving_lambda(e_w, torch.tensor([[0.0, 5.0]]), 0.5).item() == 1.0  # orthogonal
    assert losses.winner_preserving_lambda(e_w, torch.tensor([[0.1, 0.0]]), 0.5).item() == 1.0  # 5 -> clamped


def test_lose_scale_changes_the_gradient_not_the_value():
    params = LossParams(beta=20.0)
    plain, _, p0 = paired("sigmoid", params)
    scaled, metrics, p1 = paired("sigmoid", params, lose_scale=torch.tensor(0.25))
    assert scaled.item() == pytest.approx(plain.item(), abs=1e-12)
    plain.backward(), scaled.backward()
    torch.testing.assert_close(p1.grad[:2], p0.grad[:2])  # winners: unchanged
    torch.testing.assert_close(p1.grad[2:], 0.25 * p0.grad[2:])  # losers: scaled by lambda
    assert metrics["winner_preserving/lambda"].item() == 0.25


def test_safeguard_keeps_the_winners_error_from_rising_where_dpo_raises_it():
    """One shared output theta for winner and loser, with the loser's target just beyond the winner's: DPO pushes
    theta away from the loser's target and so away from the winner's too (both errors rise, the failure the safeguard
    targets). With it, the same SGD step lowers the winner's error."""
    target_w, target_l = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.1, 0.0]])
    reference = torch.tensor([0.005, 0.02], dtype=torch.float32)  # the errors at theta = (0.9, 0): policy == ref

    def winner_error_after_step(mu):
        theta = torch.tensor([[0.9, 0.0]], requires_grad=True)
        prediction, target = torch.cat([theta, theta]), torch.cat([target_w, target_l])
        scale = None if mu is None else losses.winner_preserving_lambda(*(prediction - target).chunk(2), mu)
        loss, _ = losses.compute_paired_loss([("sigmoid", 1.0)], losses.per_sample_mse(prediction, target),
                                             reference, LossParams(beta=100.0), lose_scale=scale)
        loss.backward()
        with torch.no_grad():
            return losses.per_sample_mse(theta - 0.01 * theta.grad, target_w).item()

    before = reference[0].item()
    assert winner_error_after_step(None) > before
    for mu in (0.1, 0.6, 0.9):
        assert winner_error_after_step(mu) <= before


# ----- soft labels (SmPO) -----------------------------------------------------------------------------------------
def test_soft_labels_by_hand():
    label = torch.tensor([0.9, 0.6], dtype=torch.float64)
    smpo, metrics, _ = paired("sigmoid", LossParams(beta=20.0, soft_labels="smpo"), label=label)
    expected = np.mean([-logsigmoid((2 * p - 1) * z) for p, z in zip([0.9, 0.6], Z)])
    assert smpo.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["labels/mean"].item() == pytest.approx(0.75)
    ce, _, _ = paired("sigmoid", LossParams(beta=20.0, soft_labels="cross_entropy"), label=label)
    expected = np.mean([-p * logsigmoid(z) - (1 - p) * logsigmoid(-z) for p, z in zip([0.9, 0.6], Z)])
    assert ce.item() == pytest.approx(expected, abs=1e-12)


def test_a_hard_label_is_plain_dpo_and_a_tie_gives_no_smpo_gradient():
    plain, _, _ = paired("sigmoid", LossParams(beta=20.0))
    ones = torch.ones(2, dtype=torch.float64)
    for form in ("smpo", "cross_entropy"):
        assert paired("sigmoid", LossParams(beta=20.0, soft_labels=form), label=ones)[0].item() == pytest.approx(
            plain.item(), abs=1e-12)
    tie, _, policy = paired("sigmoid", LossParams(beta=20.0, soft_labels="smpo"), label=0.5 * ones)
    tie.backward()
    assert tie.item() == pytest.approx(LN2) and torch.count_nonzero(policy.grad) == 0
    # labels are ignored unless soft_labels asks for them
    assert paired("sigmoid", LossParams(beta=20.0), label=0.5 * ones)[0].item() == pytest.approx(plain.item())


# ----- timestep mask and weights ----------------------------------------------------------------------------------
def test_timestep_mask_and_weights_by_hand():
    params = LossParams(beta=20.0, timestep_min=0.1, timestep_max=0.9, timestep_weight_power=1.0)
    level = torch.tensor([0.05, 0.5])
    assert losses.timestep_weights(torch.tensor([0.05, 0.5, 0.95]), params).tolist() == [0.0, 0.5, 0.0]
    loss, metrics, _ = paired("sigmoid", params, noise_level=level)
    assert loss.item() == pytest.approx((0.0 + 0.5 * -logsigmoid(Z[1])) / 2, abs=1e-9)  # mean over both pairs
    assert metrics["timesteps/masked"].item() == 0.5
    off, metrics, _ = paired("sigmoid", LossParams(beta=20.0), noise_level=level)
    assert off.item() == pytest.approx(np.mean([-logsigmoid(z) for z in Z])) and "timesteps/masked" not in metrics


# ----- every stabiliser changes every paired loss it applies to, and the model card records it --------------------
ON = {"winner_preserving_mu": 0.5, "soft_labels": "smpo", "timestep_min": 0.3, "timestep_max": 0.7,
      "timestep_weight_power": 2.0}
INPUTS = {"label": torch.tensor([0.9, 0.7], dtype=torch.float64), "noise_level": torch.tensor([0.2, 0.8])}


@pytest.mark.parametrize("name", sorted(n for n, spec in losses.LOSSES.items() if spec.paired))
def test_each_stabiliser_changes_each_paired_loss_it_applies_to(name):
    assert set(ON) == set(losses.STABILISER_FIELDS)
    base = LossParams(beta=20.0)
    loss, _, policy = paired(name, base, **INPUTS)
    loss.backward()
    for field, value in ON.items():
        params = dataclasses.replace(base, **{field: value})
        # the safeguard's lambda comes from the batch's errors: errors of 1 and 1 give lambda = 1 - mu
        extra = {"lose_scale": losses.winner_preserving_lambda(torch.ones(1), torch.ones(1), value)} \
            if field == "winner_preserving_mu" else {}
        changed, _, changed_policy = paired(name, params, **INPUTS, **extra)
        changed.backward()
        applies = field != "soft_labels" or losses.LOSSES[name].soft_labels
        uses_loser = name != "sft"  # the supervised loss never sees the loser's error
        differs = (not torch.allclose(changed_policy.grad, policy.grad)) or changed.item() != loss.item()
        assert differs == (applies and (field != "winner_preserving_mu" or uses_loser)), field
        assert losses.loss_hyperparameters([(name, 1.0)], params)[field] == value


def test_stabiliser_settings_are_checked():
    for bad in ({"winner_preserving_mu": 1.5}, {"soft_labels": "hard"}, {"timestep_min": 0.8, "timestep_max": 0.2},
                {"timestep_weight_power": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossParams(**bad)


# ----- soft labels from data ---------------------------------------------------------------------------------------
def test_soft_labels_from_reward_scores_follow_smpos_mapping(pairs):
    scored = pairs.add_column("chosen_score", [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.3]).add_column(
        "rejected_score", [0.1, 0.2, 0.3, 0.4, 0.5, 0.2, 0.3, 0.2])
    labels = with_soft_labels(scored)["soft_label"]
    spread = 0.9 - 0.1  # max - min over all scores
    expected = [1 / (1 + math.exp(-(w - l) / spread)) for w, l in zip(scored["chosen_score"], scored["rejected_score"])]
    assert labels == pytest.approx(expected)
    assert labels[4] == 0.5  # equal scores: a tie


def test_a_soft_label_column_is_checked_and_named_in_errors(pairs):
    good = pairs.add_column("soft_label", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.9, 1.0])
    assert with_soft_labels(good)["soft_label"] == pytest.approx(good["soft_label"])
    bad = pairs.add_column("soft_label", [1.0, 0.9, 1.3, 0.7, 0.6, 0.5, 0.9, 1.0])
    with pytest.raises(ValueError, match=r"Row 2, column 'soft_label'.*\[0, 1\]"):
        with_soft_labels(bad)
    with pytest.raises(ValueError, match="no soft-label source"):
        with_soft_labels(pairs)


def test_pickapic_ties_are_kept_with_label_half_only_when_asked(pairs):
    pickapic = Dataset.from_dict({"caption": ["a", "b", "c"], "jpg_0": pairs["chosen"][:3],
                                  "jpg_1": pairs["rejected"][:3], "label_0": [1.0, 0.5, 0.0]})
    assert len(prepare_preference_dataset(pickapic, soft_labels=True)) == 2  # ties dropped by default
    kept = prepare_preference_dataset(pickapic, soft_labels=True, keep_ties=True)
    assert kept["row_index"] == [0, 1, 2] and kept["soft_label"] == [1.0, 0.5, 1.0]
    assert kept["prompt"] == ["a", "b", "c"]


# ----- curriculum ----------------------------------------------------------------------------------------------------
def test_curriculum_goes_from_easy_to_hard_and_depends_only_on_seed_epoch_and_stage():
    margins = [0.1, 0.9, 0.5, 0.7, 0.3, 0.8]  # easiest first: rows 1, 5, 3 | 2, 4, 0
    sampler = CurriculumSampler(margins, stages=2, seed=3, num_samples=10)
    order = list(sampler)
    assert len(sampler) == len(order) == 10
    # stage 0: 5 draws from the 3 easiest rows (one whole pass, then a reshuffled one); stage 1: 5 from all six
    assert sorted(order[:3]) == [1, 3, 5] and set(order[3:5]) <= {1, 3, 5} and len(set(order[5:])) == 5
    assert [sampler.stage_at(p) for p in (0, 4, 5, 9, 10)] == [0, 0, 1, 1, 0]
    assert list(CurriculumSampler(margins, stages=2, seed=3, num_samples=10)) == order  # a fresh sampler: the same
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(list(sampler)[:3]) == [1, 3, 5]
    assert len(CurriculumSampler(margins, stages=3, seed=0)) == 6  # one draw per pair by default
    with pytest.raises(ValueError, match="curriculum_stages=7"):
        CurriculumSampler(margins, stages=7, seed=0)


def test_stabilisers_are_refused_for_unpaired_data_and_soft_labels_without_sigmoid(tmp_path, sd_path, pairs):
    with pytest.raises(ValueError, match=r"\['winner_preserving_mu'\] apply to paired data"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="kto", winner_preserving_mu=0.5),
                            train_dataset=pairs)
    with pytest.raises(ValueError, match="read by `sigmoid`"):
        DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, loss_type="hinge", soft_labels="smpo"),
                            train_dataset=pairs)


def test_config_refuses_ties_without_soft_labels(tmp_path):
    with pytest.raises(ValueError, match="keep_ties"):
        make_args(tmp_path, keep_ties=True)
    with pytest.raises(ValueError, match="curriculum_stages"):
        make_args(tmp_path, curriculum_stages=0)


# ----- training runs on the tiny SD pipeline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored(pairs):
    return pairs.add_column("chosen_score", [0.9, 0.8, 0.7, 0.6, 0.9, 0.5, 0.4, 0.8]).add_column(
        "rejected_score", [0.1, 0.6, 0.3, 0.5, 0.2, 0.4, 0.3, 0.7])


ALL_ON = dict(winner_preserving_mu=0.6, soft_labels="smpo", timestep_min=0.2, timestep_max=0.9,
              curriculum_stages=2)


def test_all_stabilisers_train_a_lora_and_log_their_metrics(tmp_path, sd_path, scored, pairs):
    args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=4, beta=5000, learning_rate=1e-4, **ALL_ON)
    # the evaluation pairs need no label source: the curriculum orders training pairs, and soft labels are off
    trainer = DiffusionDPOTrainer(model=sd_path, args=dataclasses.replace(args, soft_labels="none"),
                                  train_dataset=scored, eval_dataset=pairs, peft_config=lora())
    assert "soft_label" not in trainer.eval_dataset.column_names
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=scored, peft_config=lora())
    trainer.train()
    first = trainer.state.log_history[0]
    # the adapter starts as a no-op: every kept pair's loss is ln 2, masked pairs count 0
    assert losses_of(trainer)[0] == pytest.approx(LN2 * (1 - first["timesteps/masked"]), abs=1e-5)
    assert 0.0 <= first["winner_preserving/lambda"] <= 1.0
    assert 0.5 < first["labels/mean"] < 1.0
    stages = [h["curriculum/stage"] for h in trainer.state.log_history if "curriculum/stage" in h]
    assert stages == [0, 0, 1]  # 12 draws: 6 from the 4 easiest pairs, then 6 from all 8
    trainer.save_model()
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    assert "winner_preserving_mu`: 0.6" in card and "soft_labels`: smpo" in card and "curriculum_stages`: 2" in card
    assert "timestep_min`: 0.2" in card and "timestep_max`: 0.9" in card and "keep_ties" not in card


def test_all_stabilisers_with_a_full_finetune_cached_latents_and_precomputed_reference(tmp_path, sd_path, scored):
    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-4, precompute_latents=True,
                     precompute_text_embeddings=True, precompute_ref_errors=True, **ALL_ON)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=scored)
    trainer.train()
    first = trainer.state.log_history[0]
    assert losses_of(trainer)[0] == pytest.approx(LN2 * (1 - first["timesteps/masked"]), abs=1e-5)
    assert all(math.isfinite(x) for x in losses_of(trainer))
    assert "winner_preserving/lambda" in first and "labels/mean" in first and "curriculum/stage" in first


def test_a_resumed_curriculum_run_sees_the_same_batches(tmp_path, sd_path, scored):
    def run(name, **overrides):
        args = make_args(tmp_path / name, max_steps=4, curriculum_stages=2, soft_labels="smpo", **overrides)
        trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=scored, peft_config=lora())
        seen, collate = [], trainer.data_collator

        def recording(rows):
            seen.append([int(row["row_index"]) for row in rows])
            return collate(rows)

        trainer.data_collator = recording
        return trainer, seen

    straight, straight_rows = run("straight")
    straight.train()
    first, _ = run("first", save_steps=2, save_strategy="steps")
    first.train()
    resumed, resumed_rows = run("resumed")
    resumed.train(resume_from_checkpoint=os.path.join(first.args.output_dir, "checkpoint-2"))
    assert resumed_rows == straight_rows[2:]
    assert sorted(straight_rows[0] + straight_rows[1]) == [0, 1, 2, 4]  # stage 0: the 4 largest gaps


def test_the_noise_level_of_a_flow_family_is_its_sigma(tmp_path, sd3_path, scored):
    """Rectified-flow timesteps are sigma * 1000, so the mask reads sigma; the safeguard needs nothing family-specific."""
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=8, winner_preserving_mu=0.6, timestep_min=0.5)
    trainer = DiffusionDPOTrainer(model=sd3_path, args=args, train_dataset=scored, peft_config=lora(target_modules=None))
    seen = []
    original = trainer.family.noisy_latents_and_target
    trainer.family.noisy_latents_and_target = lambda x0, noise, t: seen.append(t) or original(x0, noise, t)
    trainer.train()
    sigmas = trainer.family.sigmas_for(seen[0][:8])
    first = trainer.state.log_history[0]
    assert first["timesteps/masked"] == pytest.approx((sigmas < 0.5).float().mean().item())
    assert losses_of(trainer)[0] == pytest.approx(LN2 * (sigmas >= 0.5).float().mean().item(), abs=1e-5)
