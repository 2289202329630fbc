"""Curriculum ordering of preference pairs (`curriculum_stages`): easy pairs first, harder ones added stage by stage.

Curriculum-DPO (Croitoru et al., CVPR 2025) ranks pairs by how clearly the winner wins and trains on the clear ones
before the subtle ones. Here the ranking is by label margin |2p - 1| (p: the pair's soft label, from a reward gap or a
dataset column, see `formats.with_soft_labels`), cut into `stages` equal parts; stage k visits the k+1 easiest
parts, so easy pairs stay in the mix while harder ones join. The order is a pure function of (seed, epoch, stage):
the Trainer sets the epoch and skips the batches it already trained on, so a resumed run sees the same batches.
"""

import numpy as np
from torch.utils.data import Sampler


class CurriculumSampler(Sampler[int]):
    """Dataset positions, one epoch = every stage in turn; each stage's rows in a (seed, epoch, stage) shuffle."""

    def __init__(self, margins, stages: int, seed: int):
        margins = np.asarray(margins, dtype=np.float64)
        if stages < 1 or stages > len(margins):
            raise ValueError(f"curriculum_stages={stages} must be between 1 and the number of pairs ({len(margins)}).")
        easiest_first = np.argsort(-margins, kind="stable")
        parts = np.array_split(easiest_first, stages)
        self.stage_rows = [np.concatenate(parts[: k + 1]) for k in range(stages)]
        self.ends = np.cumsum([len(rows) for rows in self.stage_rows])
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __iter__(self):
        for stage, rows in enumerate(self.stage_rows):
            order = np.random.default_rng([self.seed % 2**63, self.epoch, stage]).permutation(len(rows))
            yield from rows[order].tolist()

    def stage_at(self, position: int) -> int:
        """The stage (0-based) of the `position`-th sample of an epoch."""
        return int(np.searchsorted(self.ends, position % len(self), side="right"))
