"""Curriculum ordering of preference pairs (`curriculum_stages`): easy pairs first, harder ones added stage by stage.

Curriculum-DPO (Croitoru et al., CVPR 2025) ranks pairs by how clearly the winner wins and trains on the clear ones
before the subtle ones. Here the ranking is by label margin |2p - 1| (p: the pair's soft label, from a reward gap or a
dataset column, see `formats.with_soft_labels`), cut into `stages` equal parts. An epoch of the sampler is
`num_samples` draws split into `stages` equal spans; span k draws from the k+1 easiest parts (reshuffled on every
pass over them), so easy pairs stay in the mix while harder ones join. With `max_steps` the trainer makes the whole run
one such epoch, so the stages span training. The order is a pure function of (seed, epoch, stage, pass): the Trainer
sets the epoch and skips the batches it already trained on, so a resumed run sees the same batches.
"""

import numpy as np
from torch.utils.data import Sampler


class CurriculumSampler(Sampler[int]):
    """Dataset positions: `num_samples` per epoch (default: one per pair), stage by stage from easy to hard."""

    def __init__(self, margins, stages: int, seed: int, num_samples: int | None = None):
        margins = np.asarray(margins, dtype=np.float64)
        if stages < 1 or stages > len(margins):
            raise ValueError(f"curriculum_stages={stages} must be between 1 and the number of pairs ({len(margins)}).")
        easiest_first = np.argsort(-margins, kind="stable")
        parts = np.array_split(easiest_first, stages)
        self.stage_rows = [np.concatenate(parts[: k + 1]) for k in range(stages)]
        self.num_samples = len(margins) if num_samples is None else int(num_samples)
        self.ends = np.cumsum([len(span) for span in np.array_split(np.arange(self.num_samples), stages)])
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        starts = [0, *self.ends[:-1]]
        for stage, (rows, start, end) in enumerate(zip(self.stage_rows, starts, self.ends)):
            drawn, passes = [], 0
            while len(drawn) < end - start:
                generator = np.random.default_rng([self.seed % 2**63, self.epoch, stage, passes])
                drawn.extend(rows[generator.permutation(len(rows))].tolist())
                passes += 1
            yield from drawn[: end - start]

    def stage_at(self, position: int) -> int:
        """The stage (0-based) of the `position`-th draw of an epoch."""
        return int(np.searchsorted(self.ends, position % self.num_samples, side="right"))
