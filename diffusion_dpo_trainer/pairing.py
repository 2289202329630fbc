"""Scored images -> preference pairs: which images of a prompt's group are compared, and which comparisons count.

Shared by the AI-feedback datasets (`feedback.build_preference_pairs`, `select_pairs`: only the pairs) and online DPO
(`pair_slots` / `judge_slots`: a FIXED number of slots per prompt, each marked a pair or not, so that every process
forwards the same shapes whatever the scores). Equal scores never make a pair: a tie is not a preference.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

STRATEGIES = ("best_vs_worst", "all_pairs", "random")


def candidate_pairs(
    scores: Sequence[float],
    strategy: str = "best_vs_worst",
    num_pairs: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[tuple[int, int]]:
    """The (winner, loser) index pairs a strategy considers among the images of one prompt, before the score-gap
    test of `select_pairs`: their number depends only on the strategy and the group size, never on the scores.

    NaN scores (an image no reward scored) lose every comparison and fail every gap test.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; expected one of {STRATEGIES}.")
    scores = np.asarray(scores, dtype=np.float64)
    if strategy == "best_vs_worst":
        finite = np.isfinite(scores)
        if not finite.any():
            return [(0, 0)]
        ranked = np.where(finite, scores, -np.inf), np.where(finite, scores, np.inf)
        return [(int(np.argmax(ranked[0])), int(np.argmin(ranked[1])))]
    candidates = list(combinations(range(len(scores)), 2))
    if strategy == "random":
        rng = rng if rng is not None else np.random.default_rng()
        count = len(candidates) if num_pairs is None else min(num_pairs, len(candidates))
        candidates = [candidates[i] for i in rng.choice(len(candidates), size=count, replace=False)]
    return [(i, j) if scores[i] >= scores[j] else (j, i) for i, j in candidates]


def is_preference(chosen_score: float, rejected_score: float, min_score_gap: float = 0.0) -> bool:
    """A pair counts only if the chosen score exceeds the rejected one by MORE than the gap (never on a tie or NaN)."""
    return bool(chosen_score - rejected_score > min_score_gap)


def select_pairs(
    scores: Sequence[float],
    strategy: str = "best_vs_worst",
    min_score_gap: float = 0.0,
    num_pairs: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs among the images of one prompt.

    A pair is kept only if the chosen score exceeds the rejected one by MORE than `min_score_gap`: equal scores
    never make a pair (a tie is not a preference).

    - `best_vs_worst`: the highest against the lowest score (first index on ties); at most one pair.
    - `all_pairs`: every unordered pair, winner by score.
    - `random`: `num_pairs` unordered pairs drawn without replacement with `rng` (all of them if `None`), then
      labelled by score; pairs that fail the gap are dropped, not redrawn.
    """
    if min_score_gap < 0:
        raise ValueError(f"min_score_gap must be >= 0 (a tie is not a preference), got {min_score_gap}.")
    scores = [float(s) for s in scores]
    return [(winner, loser) for winner, loser in candidate_pairs(scores, strategy, num_pairs, rng)
            if is_preference(scores[winner], scores[loser], min_score_gap)]


@dataclass
class Slots:
    """Fixed pair slots over groups of `n` images (image `g * n + j` is image j of prompt g): per slot the prompt's
    group, the chosen and rejected image's global index, and whether the slot is a pair (`valid`)."""

    group: list[int]
    chosen: list[int]
    rejected: list[int]
    valid: torch.Tensor


def pair_slots(totals: torch.Tensor, n: int, strategy: str = "best_vs_worst", min_score_gap: float = 0.0) -> Slots:
    """Slots from combined scores (NaN: not scored): `candidate_pairs` per group, a pair where `is_preference`."""
    slots = []
    for g in range(len(totals) // n):
        group = totals[g * n : (g + 1) * n].tolist()
        for winner, loser in candidate_pairs(group, strategy):
            slots.append((g, g * n + winner, g * n + loser, is_preference(group[winner], group[loser], min_score_gap)))
    return _slots(slots)


def judge_slots(judge, prompts: Sequence[str], images: Sequence, n: int) -> Slots:
    """Slots from TRL's pairwise judge: images (0, 1), (2, 3), ... of each prompt are judged as pairs;
    `judge.judge(prompts, [[a, b], ...])` answers 0 or 1 (the better image) or -1 (no decision: no pair)."""
    starts = [(g, j) for g in range(len(prompts)) for j in range(0, n, 2)]
    verdicts = judge.judge([prompts[g] for g, _ in starts],
                           [[images[g * n + j], images[g * n + j + 1]] for g, j in starts])
    if len(verdicts) != len(starts):
        raise ValueError(f"The judge returned {len(verdicts)} verdicts for {len(starts)} pairs.")
    slots = []
    for (g, j), verdict in zip(starts, verdicts, strict=True):
        if verdict not in (0, 1, -1):
            raise ValueError(f"The judge returned {verdict!r} for prompt {prompts[g]!r}; expected 0 or 1 (the "
                             "better image) or -1 (no decision).")
        winner = j + 1 if verdict == 1 else j
        slots.append((g, g * n + winner, g * n + 2 * j + 1 - winner, verdict != -1))
    return _slots(slots)


def _slots(rows: list[tuple[int, int, int, bool]]) -> Slots:
    group, chosen, rejected, valid = zip(*rows, strict=True)
    return Slots(list(group), list(chosen), list(rejected), torch.tensor(valid))
