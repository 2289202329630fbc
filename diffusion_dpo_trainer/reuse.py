"""Reusing a rollout for several optimizer steps (GRPO's mu, `num_iterations`): the prompt order that makes it
possible, the buffer of generated batches, and their place in a checkpoint for an exact resume.

`RepeatedWindowSampler` repeats one optimizer step's prompts (over all processes and micro-steps) `repeats` times in
a row, so the steps that reuse a rollout see the prompts it was sampled for. `RolloutBuffer` keeps, per micro-step,
the batch generated at the window's first step; it is saved with a checkpoint (one file pair per process) whenever
the next step would still reuse it, and a checkpoint that should hold it but does not is refused by file name.
"""

import json
import math
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class RepeatedWindowSampler(torch.utils.data.Sampler):
    """A permutation of the prompts per epoch, cut into windows of one optimizer step's prompts over all processes
    and micro-steps, each window repeated `repeats` times in a row (the optimizer steps that reuse its samples).

    The last window is filled from the start of the permutation, so every window is complete. `set_epoch` (called by
    the Trainer) reshuffles, from the seed and the epoch only, so a resumed run sees the same order.
    """

    def __init__(self, size: int, window: int, repeats: int, seed: int):
        self.size, self.window, self.repeats, self.seed, self.epoch = size, window, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.window) * self.window * self.repeats

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        windows = math.ceil(self.size / self.window)
        order = (order * math.ceil(windows * self.window / self.size))[: windows * self.window]
        for start in range(0, len(order), self.window):
            for _ in range(self.repeats):
                yield from order[start : start + self.window]


class RolloutBuffer:
    """Micro-step -> the batch it trains on until the next rollout (tensors, and plain values such as prompts)."""

    def __init__(self, num_iterations: int):
        self.num_iterations = num_iterations
        self.batches: dict[int, dict] = {}
        self._last = (None, -1)  # (optimizer step, micro-step within it) of the last training step

    def batch(self, step: int, generate) -> tuple[dict, bool]:
        """This micro-step's batch at optimizer step `step` and whether it was generated now: `generate()` at the
        first step of each window (and after a resume that saved nothing to reuse), the kept batch otherwise."""
        micro = self._last[1] + 1 if self._last[0] == step else 0
        self._last = (step, micro)
        fresh = step % self.num_iterations == 0 or micro not in self.batches
        if fresh:
            self.batches[micro] = generate(micro)
        return self.batches[micro], fresh

    def is_reused_after(self, step: int) -> bool:
        """Whether the steps after `step` (the optimizer steps done) still reuse the kept batches."""
        return self.num_iterations > 1 and step % self.num_iterations != 0

    @staticmethod
    def files(folder: str, rank: int) -> tuple[str, str]:
        stem = os.path.join(folder, f"online_buffer_{rank}")
        return f"{stem}.safetensors", f"{stem}.json"

    def save(self, folder: str, rank: int, step: int) -> None:
        """Write this process's kept batches when the step after `step` reuses them (nothing otherwise)."""
        if not self.is_reused_after(step):
            return
        tensors, meta = {}, {}
        for micro, batch in self.batches.items():
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{micro}/{key}"] = value.contiguous()
                else:
                    meta[f"{micro}/{key}"] = value
        tensor_file, meta_file = self.files(folder, rank)
        save_file(tensors, tensor_file)
        with open(meta_file, "w", encoding="utf-8") as f:
            json.dump(meta, f)

    def load(self, folder: str, rank: int, step: int) -> None:
        """Read the batches `save` wrote at `step`; a checkpoint that should hold them and does not is refused."""
        self.batches = {}
        if not self.is_reused_after(step):
            return
        tensor_file, meta_file = self.files(folder, rank)
        tensors, meta = _read(tensor_file, load_file, step, self.num_iterations), _read(meta_file, _load_json, step,
                                                                                       self.num_iterations)
        for name, value in [*tensors.items(), *meta.items()]:
            micro, key = name.split("/", 1)
            self.batches.setdefault(int(micro), {})[key] = value


def saved_step(folder: str) -> int:
    """The optimizer step a checkpoint was saved at, from the file that marks it complete."""
    path = os.path.join(folder, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"Cannot resume: {path} is missing or unreadable ({type(exc).__name__}); the checkpoint is "
                         "incomplete (a run stopped while saving it): resume from an earlier one.") from exc


def _load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read(path: str, reader, step: int, num_iterations: int):
    try:
        return reader(path)
    except (OSError, SafetensorError, ValueError) as exc:
        raise ValueError(
            f"Cannot resume: {path} is missing or unreadable ({type(exc).__name__}), but the checkpoint's step {step} "
            f"is inside a num_iterations={num_iterations} window, so the next steps reuse the samples it holds. The "
            "checkpoint is incomplete: resume from an earlier one."
        ) from exc
