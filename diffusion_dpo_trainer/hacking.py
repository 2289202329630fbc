"""Signals that move when a policy hacks its reward, and the rule that raises the alarm.

On-policy training over-optimises the reward it sees, and users find out after the run: grid artefacts within a few
epochs (flow_grpo #233, DanceGRPO #36), blanked backgrounds under an OCR reward without KL (UniRL #407), learned
VAE-tiling seams (DanceGRPO #117). Each signal here is a pure function of PIL images, cheap, model-free (so it means
the same whatever reward is trained on), and catches one of these failures:

- `diversity`: mean pairwise RMS distance of the images of ONE prompt (0: identical, 1: black vs white); catches
  mode collapse, every seed drawing the same picture;
- `colour_entropy`: entropy (bits) of the colours, 8 levels per channel (0: one colour, at most 9); catches blank or
  flat backgrounds and posterised images;
- `saturation`: mean HSV saturation (0: grey, 1: pure colours); catches the over-saturated look that preference
  rewards drift to;
- `high_frequency_energy`: share of the luma's spectral energy above 1/4 cycle per pixel (white noise: about 0.80);
  catches noise, speckle and over-sharpening;
- `grid_energy`: share of the luma's spectral energy at frequencies repeating every 8 px; catches grids and seams at
  the VAE's 8 px latent stride.

The diversity features are the image's pixels downsampled to 16 x 16 (RGB, area averaging): a fixed feature, the
same for every run, independent of the reward model (so it does not share the trained reward's blind spots), and
cheap enough to run every few steps. It measures layout and colour, not semantics: a policy that draws the same
object in different colours still counts as diverse.

`hacking_alerts` compares the latest evaluation with the first (the policy before training): the training reward
rose while a held-out reward fell, or diversity fell below a fraction of where it started. `RewardHackingCallback`
(evaluation.py) logs all of this every N steps during training and can stop the run.
"""

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

FEATURE_SIZE = 16
COLOUR_LEVELS = 8
HIGH_FREQUENCY_CUTOFF = 0.25
GRID_PERIOD = 8
STATISTICS = ("colour_entropy", "saturation", "high_frequency_energy", "grid_energy")


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _luma_spectrum(image: Image.Image, crop_to: int = 1) -> np.ndarray:
    """Energy |FFT|^2 of the mean-free luma (ITU-R 601 weights), the image cropped to multiples of `crop_to`."""
    luma = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    height, width = (luma.shape[0] // crop_to) * crop_to, (luma.shape[1] // crop_to) * crop_to
    luma = luma[:height, :width]
    return np.abs(np.fft.fft2(luma - luma.mean())) ** 2


def image_features(images: Sequence[Image.Image], size: int = FEATURE_SIZE) -> np.ndarray:
    """(N, size * size * 3): each image's RGB pixels in [0, 1], downsampled (area averaging) to size x size."""
    return np.stack([_rgb(image.convert("RGB").resize((size, size), Image.BOX)).ravel() for image in images])


def diversity(images: Sequence[Image.Image], size: int = FEATURE_SIZE) -> float:
    """Mean over pairs of the RMS distance of the images' features (`image_features`): in [0, 1]."""
    if len(images) < 2:
        raise ValueError(f"Diversity needs at least two images, got {len(images)}.")
    features = image_features(images, size)
    distances = [np.sqrt(np.mean((features[i] - features[j]) ** 2))
                 for i in range(len(features)) for j in range(i + 1, len(features))]
    return float(np.mean(distances))


def _by_prompt(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[list[Image.Image]]:
    if len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; expected one prompt per image.")
    groups = defaultdict(list)
    for image, prompt in zip(images, prompts):
        groups[prompt].append(image)
    return list(groups.values())


def within_prompt_diversity(images: Sequence[Image.Image], prompts: Sequence[str], size: int = FEATURE_SIZE) -> float:
    """`diversity` of the images of each prompt (the seeds of one prompt), averaged over prompts: the spread a
    policy keeps for ONE request, which collapse destroys (across prompts, images differ anyway)."""
    values = [diversity(group, size) for group in _by_prompt(images, prompts) if len(group) > 1]
    if not values:
        raise ValueError("Within-prompt diversity needs at least two images of one prompt (several seeds).")
    return float(np.mean(values))


def colour_entropy(image: Image.Image, levels: int = COLOUR_LEVELS) -> float:
    """Shannon entropy (bits) of the image's colours quantised to `levels` per channel: 0 for one colour, at most
    3 * log2(levels) (9 bits) when every quantised colour is equally frequent."""
    quantised = np.minimum((_rgb(image) * levels).astype(np.int64), levels - 1)
    codes = (quantised[..., 0] * levels + quantised[..., 1]) * levels + quantised[..., 2]
    p = np.bincount(codes.ravel(), minlength=levels**3) / codes.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() + 0.0)


def saturation(image: Image.Image) -> float:
    """Mean HSV saturation, (max - min) / max of each pixel's RGB (0 for black): 0 grey, 1 pure colours."""
    rgb = _rgb(image)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return float(np.mean(np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0)))


def high_frequency_energy(image: Image.Image, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> float:
    """Share of the mean-free luma's spectral energy at radial frequencies above `cutoff` cycles per pixel (Nyquist
    is 0.5): 0 for a flat or smooth image, 1 for a one-pixel checkerboard, about 1 - pi * cutoff^2 (0.80) for white
    noise, whose energy is spread evenly over the frequency square."""
    energy = _luma_spectrum(image)
    total = energy.sum()
    if total <= 0:
        return 0.0
    fy, fx = np.meshgrid(np.fft.fftfreq(energy.shape[0]), np.fft.fftfreq(energy.shape[1]), indexing="ij")
    return float(energy[np.hypot(fx, fy) > cutoff].sum() / total)


def grid_energy(image: Image.Image, period: int = GRID_PERIOD) -> float:
    """Share of the mean-free luma's spectral energy at frequencies that repeat every `period` pixels on either axis
    (the non-zero multiples of 1 / period), the image cropped to a multiple of `period`: 1 for any pattern that tiles
    with that period (a grid, seams between 8 px latent tiles), 0 for a flat image, and (period - 1) * (1/H + 1/W)
    for white noise (the share of such frequencies: 0.21 at 64 px, 0.03 at 512 px)."""
    energy = _luma_spectrum(image, crop_to=period)
    total = energy.sum()
    if total <= 0:
        return 0.0
    rows, cols = np.arange(energy.shape[0]), np.arange(energy.shape[1])
    on_rows = (rows != 0) & (rows % (energy.shape[0] // period) == 0)
    on_cols = (cols != 0) & (cols % (energy.shape[1] // period) == 0)
    return float(energy[on_rows[:, None] | on_cols[None, :]].sum() / total)


def image_statistics(images: Sequence[Image.Image]) -> dict[str, float]:
    """The mean over images of each per-image statistic (`STATISTICS`)."""
    if not images:
        raise ValueError("Image statistics need at least one image.")
    functions = {"colour_entropy": colour_entropy, "saturation": saturation,
                 "high_frequency_energy": high_frequency_energy, "grid_energy": grid_energy}
    return {name: float(np.mean([functions[name](image) for image in images])) for name in STATISTICS}


def grouped_signals(groups: Iterable[Sequence[Image.Image]]) -> dict[str, float]:
    """`image_statistics` over all images and, when some group has several images, the mean `diversity` within
    groups (a group: the images of one prompt). Groups may be a generator: one group is held in memory at a time."""
    sums, count, spreads = dict.fromkeys(STATISTICS, 0.0), 0, []
    for group in groups:
        for name, value in image_statistics(group).items():
            sums[name] += value * len(group)
        count += len(group)
        if len(group) > 1:
            spreads.append(diversity(group))
    if not count:
        raise ValueError("Image statistics need at least one image.")
    signals = {name: total / count for name, total in sums.items()}
    if spreads:
        signals["diversity"] = float(np.mean(spreads))
    return signals


def hacking_signals(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """`grouped_signals` of the images grouped by prompt: `diversity` is within-prompt (present when some prompt has
    several images)."""
    return grouped_signals(_by_prompt(images, prompts))


def hacking_alerts(history: Sequence[dict], diversity_drop: float = 0.5, heldout_tolerance: float = 0.0,
                   reward_tolerance: float = 0.0) -> list[str]:
    """Alarms from evaluations `history` (dicts with `reward`, `heldout_reward`, `diversity`, `step`; any may be
    missing), the latest against the first:

    - the training reward rose by more than `reward_tolerance` while the held-out reward fell by more than
      `heldout_tolerance` (same units as each reward): the policy is learning the reward model, not the task;
    - diversity fell below `(1 - diversity_drop)` times its first value (0.5: to half): mode collapse.
    """
    if not 0 <= diversity_drop <= 1:
        raise ValueError(f"diversity_drop must be a fraction in [0, 1], got {diversity_drop}.")
    if len(history) < 2:
        return []
    first, last = history[0], history[-1]
    alerts = []

    def both(key):
        return all(isinstance(h.get(key), (int, float)) and math.isfinite(h[key]) for h in (first, last))

    if both("reward") and both("heldout_reward") and last["reward"] - first["reward"] > reward_tolerance \
            and first["heldout_reward"] - last["heldout_reward"] > heldout_tolerance:
        alerts.append(f"the training reward rose from {first['reward']:.4g} to {last['reward']:.4g} while the held-out "
                      f"reward fell from {first['heldout_reward']:.4g} to {last['heldout_reward']:.4g} "
                      f"(steps {first.get('step')} to {last.get('step')})")
    if both("diversity") and last["diversity"] < (1 - diversity_drop) * first["diversity"]:
        alerts.append(f"within-prompt diversity collapsed from {first['diversity']:.4g} to {last['diversity']:.4g}, "
                      f"below {1 - diversity_drop:.0%} of where it started (steps {first.get('step')} to "
                      f"{last.get('step')})")
    return alerts
