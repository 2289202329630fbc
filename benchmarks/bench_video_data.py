"""Time to collate one video pair: decoding mp4 files (PyAV) and transforming the clips, against collating the same
pair from cached latents, alternating in one run. It says how many dataloader workers keep a GPU fed without a latent
cache, and what the cache saves on the CPU side (the VAE encode it also saves is on the GPU, not measured here).

    PYTHONPATH=. python benchmarks/bench_video_data.py                   # 81-frame 832x480 sources, 49-frame clips
    PYTHONPATH=. python benchmarks/bench_video_data.py --num-frames 81 --video-fps 16 --repeats 20

The sources are synthetic H.264 mp4 files (a textured background with moving squares) at `--width` x `--height`,
`--source-frames` frames at 16 fps; the clip is `--num-frames` frames resampled to `--video-fps`, resized and cropped
to `--resolution`. The cached row holds Wan 2.1 latent shapes (16 channels, (F - 1)/4 + 1 latent frames, 8x smaller).
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from diffusion_dpo_trainer.video_data import VideoPreferenceCollator, encode_video


def synthetic_frames(count, height, width, seed):
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    background = np.kron(background, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    frames = np.repeat(background[None], count, axis=0)
    side = height // 4
    for index in range(count):
        left = (7 * index) % (width - side)
        frames[index, side : 2 * side, left : left + side] = (230, 60, 40)
    return frames


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--source-frames", type=int, default=81)
    parser.add_argument("--num-frames", type=int, default=49)
    parser.add_argument("--video-fps", type=float, default=16)
    parser.add_argument("--resolution", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=10)
    options = parser.parse_args()
    torch.set_num_threads(1)

    videos = [encode_video(synthetic_frames(options.source_frames, options.height, options.width, seed), fps=16)
              for seed in (0, 1)]
    collator = VideoPreferenceCollator(options.resolution, options.num_frames, fps=options.video_fps,
                                       random_crop=True, random_flip=True)
    decoded_row = {"prompt": "a red square", "chosen": videos[0], "rejected": videos[1], "row_index": 0}
    latent = (16, (options.num_frames - 1) // 4 + 1, options.resolution // 8, options.resolution // 8)
    cached_row = {"prompt": "a red square", "row_index": 0}
    for side in ("chosen", "rejected"):
        for stat in ("latent_mean", "latent_std"):
            cached_row[f"{side}_{stat}"] = cached_row[f"{side}_{stat}_flipped"] = torch.randn(latent)
        cached_row[f"{side}_original_size"] = torch.tensor([options.height, options.width])
        cached_row[f"{side}_crop_top_left"] = cached_row[f"{side}_crop_top_left_flipped"] = torch.tensor([0, 0])

    times = {"decoded": [], "cached": []}
    collator([decoded_row]), collator([cached_row])  # warm-up
    for _ in range(options.repeats):  # alternating, so a busy machine slows both alike
        for name, row in (("decoded", decoded_row), ("cached", cached_row)):
            start = time.perf_counter()
            batch = collator([row])
            times[name].append(time.perf_counter() - start)
    assert batch["chosen_latent_mean"].shape[1:] == latent
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "source": f"{options.source_frames} frames {options.width}x{options.height} @16 fps, mp4 (H.264)",
        "clip": f"{options.num_frames} frames @{options.video_fps:g} fps, {options.resolution}px",
        "median_s_per_pair_decoded": round(medians["decoded"], 4),
        "median_s_per_pair_cached": round(medians["cached"], 6),
        "ratio_decoded_over_cached": round(medians["decoded"] / medians["cached"], 1),
        "repeats": options.repeats,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
