"""rewards/scoring.py: the one reward call and check every caller shares (both conventions, None, named errors,
weights, per-function scores), and the fixed pair slots of pairing.py. Pure Python: no model."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo_trainer.pairing import judge_slots, pair_slots
from diffusion_dpo_trainer.rewards import WeightedReward
from diffusion_dpo_trainer.rewards.scoring import combine_scores, score_images, takes_trl_keywords

IMAGES = ["img0", "img1", "img2", "img3"]  # the scoring layer never looks inside an image
PROMPTS = ["a cat", "a cat", "a dog", "a dog"]


def ours(images, prompts):
    return [float(len(p)) + i for i, p in enumerate(prompts)]


def trl(prompts, completions, **kwargs):
    return [10.0 * k for k in kwargs["rank"]]


def test_both_calling_conventions_and_the_columns():
    assert takes_trl_keywords(trl) and takes_trl_keywords(lambda **kw: None) and not takes_trl_keywords(ours)
    scores = score_images([ours, trl], IMAGES, PROMPTS, columns={"rank": [1, 2, 3, 4], "trainer_state": object()},
                          batch_size=2)
    # batches of 2: `ours` sees indices 0, 1 per batch; TRL columns are sliced per batch.
    assert scores.per_function[:, 0].tolist() == [5.0, 6.0, 5.0, 6.0]
    assert scores.per_function[:, 1].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert scores.names == ["ours", "trl"]
    assert scores.total.tolist() == [15.0, 26.0, 35.0, 46.0]


def test_weights_skip_unscored_images_and_names_stay_unique():
    def half_none(images, prompts):
        return [None if i % 2 else 1.0 for i in range(len(images))]

    scores = score_images([half_none, half_none], IMAGES, PROMPTS, weights=[0.5, -2.0])
    assert scores.names == ["half_none_0", "half_none_1"]
    assert scores.total[0].item() == 0.5 * 1.0 - 2.0 * 1.0
    assert math.isnan(scores.total[1].item())  # no function scored it: never paired
    table = torch.tensor([[1.0, 2.0], [math.nan, 3.0], [4.0, math.nan], [math.nan, math.nan]], dtype=torch.float64)
    combined = combine_scores(table, [0.5, -2.0])
    assert combined[:3].tolist() == [0.5 * 1 - 2 * 2, -2 * 3.0, 0.5 * 4]
    assert math.isnan(combined[3])


@pytest.mark.parametrize(("value", "error", "message"), [
    (math.nan, ValueError, r"'bad' returned nan for image 3 \(prompt 'a dog'\); expected a finite number"),
    (math.inf, ValueError, r"'bad' returned inf for image 3 \(prompt 'a dog'\)"),
    (np.float32("nan"), ValueError, r"'bad' returned nan for image 3"),
    ("high", TypeError, r"'bad' returned 'high' \(str\) for image 3 \(prompt 'a dog'\)"),
    (True, TypeError, r"'bad' returned True \(bool\) for image 3"),
])
def test_a_bad_score_names_the_reward_the_image_and_its_prompt(value, error, message):
    def bad(images, prompts):
        return [1.0] * (len(images) - 1) + [value if prompts[-1] == "a dog" else 1.0]

    with pytest.raises(error, match=message):
        score_images([bad], IMAGES, PROMPTS, batch_size=2)


def test_counts_and_none_where_every_image_needs_a_score():
    with pytest.raises(ValueError, match="'short' returned 3 values for 4 images"):
        score_images([lambda images, prompts: [1.0] * 3], IMAGES, PROMPTS, names=["short"])
    with pytest.raises(ValueError, match=r"'none' returned None for image 1 \(prompt 'a cat'\)"):
        score_images([lambda images, prompts: [0.0, None, 0.0, 0.0]], IMAGES, PROMPTS, names=["none"],
                     allow_none=False)
    assert score_images([lambda images, prompts: [np.float32(2), torch.tensor(3.0), 4, 5.0]], IMAGES,
                        PROMPTS).total.tolist() == [2.0, 3.0, 4.0, 5.0]


def test_weighted_reward_is_the_scoring_functions_weighted_sum():
    def partial(images, prompts):
        return [None, 1.0, 2.0, 3.0]

    images = [Image.new("RGB", (2, 2))] * 4
    # ours: len(prompt) + index in the batch (5 + i); plus half of partial where it scored
    assert WeightedReward([(ours, 1.0), (partial, 0.5)])(images, PROMPTS) == [5.0, 6.5, 8.0, 9.5]
    assert WeightedReward([(partial, 2.0)])(images, PROMPTS) == [None, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match=r"returned nan for image 0"):
        WeightedReward([(lambda images, prompts: [math.nan] * len(images), 1.0)])(images, PROMPTS)


def test_pair_slots_are_fixed_per_prompt_and_never_pair_ties():
    totals = torch.tensor([0.2, 0.9, 0.5, 0.5, math.nan, math.nan], dtype=torch.float64)
    slots = pair_slots(totals, 2)
    assert (slots.group, slots.chosen, slots.rejected) == ([0, 1, 2], [1, 2, 4], [0, 2, 4])
    assert slots.valid.tolist() == [True, False, False]
    gap = pair_slots(torch.tensor([0.0, 1.0, 0.0, 3.0]), 2, min_score_gap=1.0)
    assert gap.valid.tolist() == [False, True]
    every = pair_slots(torch.tensor([3.0, 1.0, 2.0]), 3, "all_pairs")
    assert list(zip(every.chosen, every.rejected)) == [(0, 1), (0, 2), (2, 1)]


def test_judge_slots_follow_the_verdicts():
    class Judge:
        def judge(self, prompts, completions):
            return [1, -1, 0][: len(prompts)]

    slots = judge_slots(Judge(), ["a", "b", "c"], [f"im{i}" for i in range(6)], 2)
    assert (slots.chosen, slots.rejected, slots.valid.tolist()) == ([1, 2, 4], [0, 3, 5], [True, False, True])

    class Bad:
        def judge(self, prompts, completions):
            return [2] * len(prompts)

    with pytest.raises(ValueError, match="returned 2 for prompt 'a'"):
        judge_slots(Bad(), ["a"], ["x", "y"], 2)
