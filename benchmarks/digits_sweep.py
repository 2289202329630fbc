"""Validation sweep behind the digits demo's settings (examples/digits_alignment.py): reward model and DPO strength.

For each pipeline seed it builds the demo's base model, reward model and judge (the seed picks the data split), then
for each setting and each DPO seed trains the demo's LoRA and lets the judge compare it with the base model on
VALIDATION sampling seeds (2e9 + s): disjoint from the pair-sampling seeds and from the held-out seeds the demo reports
(1e9 + ...). Tune on pipeline seeds the demo does not report (docs/alignment-demo.md used 3 and 4; it reports 0-2).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/digits_sweep.py --seeds 3 4 --dpo-seeds 0 1 \\
        "reward=logistic,beta=5000,dpo_learning_rate=1e-3,dpo_steps=150" reward=svm

A setting is comma-separated overrides of the demo's `Settings` fields, plus `reward=svm` (the demo's calibrated
RBF-SVM) or `reward=logistic` (a logistic regression, C=0.5), and `online=1` for on-policy DPO (the demo's --online;
`online_iterations`, `images_per_group`, `dpo_batch_size` set its sampling; any scalar field that
`DiffusionOnlineDPOConfig` adds, e.g. `pair_strategy=all_pairs` or `sync_ref_model=1`, is passed on), `grpo=1` for
GRPO (the demo's --grpo, from `FULL_GRPO`; scalar `DiffusionGRPOConfig` fields such as `epsilon=1e-3` pass on) or
`nft=1` for DiffusionNFT (the demo's --nft, from `FULL_NFT`; scalar `DiffusionNFTConfig` fields such as
`ema_decay_type=2` pass on; its logs also carry `cpu_s`, the process CPU seconds since training began). Prints one
JSON line per run, then a Markdown table;
"judge agrees with pair labels" is the share of AI-feedback pairs whose chosen image the judge also scores higher.
`--reference-points 8` first prints, per pipeline seed, the judged win rates of two yardsticks against base samples:
best-of-k base samples picked by the reward model, and real scans (see `reference_points`).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from sklearn.linear_model import LogisticRegression
from transformers import TrainerCallback

from diffusion_dpo_trainer import (
    DiffusionDPOConfig,
    DiffusionGRPOConfig,
    DiffusionNFTConfig,
    DiffusionOnlineDPOConfig,
    evaluate_win_rate,
)
from diffusion_dpo_trainer.sampling import sample_images

# The demo's building blocks live in examples/digits_common.py, a module the demo and this sweep share.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_common as demo

VALIDATION_SEED_OFFSET = 2 * 10**9
REFERENCE_SEED_OFFSET = VALIDATION_SEED_OFFSET + 10**8  # --reference-points samples: disjoint from the above


def reference_points(base_path, reward, judge, pixels_a, labels_a, n: int, per_digit: int) -> dict:
    """What the judge thinks of two models the demo does not train, against one base sample per comparison:
    best-of-k base samples picked by the reward model (k = 1, 2, 4, ... n: the usual KL-bounded yardstick of reward
    tuning) and real scans of half A (the generator's own training data). Unlike the demo's comparison, the two sides
    do not share a sampling seed, so these are yardsticks, not bounds."""
    pipe = DiffusionPipeline.from_pretrained(base_path)
    prompts = [p for p in demo.PROMPTS for _ in range(per_digit * (n + 1))]
    seeds = [REFERENCE_SEED_OFFSET + i for i in range(len(prompts))]
    images = sample_images(pipe, prompts, seeds, batch_size=demo.FULL.batch_size, progress="Sampling base model",
                           **demo.sampling_kwargs(demo.FULL))
    shape = (len(demo.PROMPTS), per_digit, n + 1)  # sample 0 of each group is the base side of the comparison
    rewards, judged = (np.array(score(images, prompts)).reshape(shape) for score in (reward, judge))
    points, k = {}, 1
    while k <= n:
        picked = rewards[..., 1 : k + 1].argmax(-1)[..., None]
        best = np.take_along_axis(judged[..., 1 : k + 1], picked, -1)[..., 0]
        points[f"best_of_{k}"] = demo.score_win_rate(best, judged[..., 0])
        k *= 2
    rng = np.random.default_rng(0)
    base_prompts = prompts[:: n + 1]
    real = []
    for digit in demo.wanted_digits(base_prompts):
        scans = pixels_a[torch.from_numpy(labels_a == digit)]
        real.append(Image.fromarray(np.uint8(scans[rng.integers(len(scans))].numpy() * 255 + 0.5)).convert("RGB"))
    points["real_digits"] = demo.score_win_rate(np.array(judge(real, base_prompts)), judged[..., 0].reshape(-1))
    return points


class _CPUSeconds(TrainerCallback):
    """Adds `cpu_s`, the process CPU seconds since training began, to every log: the cost axis of a reward curve that
    a shared machine's wall time would distort."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.process_time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        state.log_history[-1]["cpu_s"] = round(time.process_time() - self.start, 2)  # the entry just logged


def parse_setting(text: str, defaults: demo.Settings = demo.FULL) -> tuple[str, str, demo.Settings, dict]:
    """(reward, method: offline, online, grpo or nft, the demo's Settings from `defaults` (GRPO, NFT: the base's GRPO or
    NFT settings), the method's own config overrides) of one setting."""
    fields = {f.name: f.type for f in dataclasses.fields(demo.Settings)}
    items = text.split(",")
    method = next((m for m in ("grpo", "nft", "online") if f"{m}=1" in items), "offline")
    config_class = {"grpo": DiffusionGRPOConfig, "nft": DiffusionNFTConfig}.get(method, DiffusionOnlineDPOConfig)
    online_fields = {f.name: f.default for f in dataclasses.fields(config_class)
                     if f.name not in {g.name for g in dataclasses.fields(DiffusionDPOConfig)}}
    reward, overrides, config, dpo_config = "svm", {}, {}, {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key == "reward" and value in ("svm", "logistic"):
            reward = value
        elif key in ("online", "grpo", "nft"):
            continue
        elif key in fields:
            overrides.update([demo.setting_option(item)])
        elif key in online_fields and isinstance(online_fields[key], (bool, int, float, str)):
            kind = type(online_fields[key])
            config[key] = value in ("1", "true", "True") if kind is bool else kind(value)
        else:
            try:  # DiffusionDPOConfig's own fields (e.g. winner_preserving_mu, soft_labels), any method
                dpo_config.update([demo.dpo_option(item)])
            except ValueError:
                raise SystemExit(f"unknown setting {item!r} in {text!r}: use reward=svm|logistic, online=1, grpo=1, "
                                 f"nft=1, {sorted(fields)}, DiffusionDPOConfig's own fields, or ({method}) "
                                 f"{sorted(online_fields)}") from None
    if config and method == "offline":
        raise SystemExit(f"{sorted(config)} in {text!r} apply to online DPO, GRPO or NFT only: add online=1, grpo=1 or "
                         "nft=1.")
    base = demo.settings_for(defaults.base, grpo=method == "grpo", nft=method == "nft") if method in ("grpo", "nft") \
        else defaults
    return reward, method, dataclasses.replace(base, **overrides), {**config, **dpo_config}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", help='e.g. "reward=svm,beta=2500,dpo_steps=300"')
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4], help="pipeline seeds (data split, models)")
    parser.add_argument("--dpo-seeds", type=int, nargs="+", default=[0], help="offsets added to the DPO seed")
    parser.add_argument("--validation-seeds", type=int, default=30, help="sampling seeds per digit for the judge")
    parser.add_argument("--base", choices=("epsilon", "flow"), default="epsilon",
                        help="the demo's base model (its --base): settings start from its full offline settings")
    parser.add_argument("--work-dir", default=None, help="keeps the base pipelines (base-S) for later sweeps")
    parser.add_argument("--log-dir", default=None,
                        help="writes each run's trainer.state.log_history and row as JSON there (training curves)")
    parser.add_argument("--base-cache", default=None, metavar="DIR",
                        help="the demo's --base-cache: pretrained bases shared with demo runs and other sweeps")
    parser.add_argument("--reference-points", type=int, default=0, metavar="N",
                        help="also judge best-of-k (k = 1, 2, 4, ... N) base samples picked by the reward model, and "
                             "real scans, against base samples (the yardsticks of docs/online-dpo.md)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="digits-sweep-")
    seeds = [VALIDATION_SEED_OFFSET + s for s in range(args.validation_seeds)]
    defaults = demo.settings_for(args.base)
    rows = []
    for seed in args.seeds:
        (pixels_a, labels_a), (pixels_b, labels_b) = demo.load_halves(seed)
        base_path = os.path.join(work_dir, f"base-{seed}" if args.base == "epsilon" else f"{args.base}-base-{seed}")
        if not os.path.exists(os.path.join(base_path, "model_index.json")):
            demo.build_base_pipeline(base_path, pixels_a, labels_a, defaults, seed, lambda *_: None,
                                     cache_dir=args.base_cache)
        judge = demo.digit_classifier(pixels_b, labels_b)
        rewards = {
            "svm": demo.digit_classifier(pixels_a, labels_a),
            "logistic": demo.DigitProbability(
                LogisticRegression(C=0.5, max_iter=2000).fit(demo.features(pixels_a), labels_a)
            ),
        }
        if args.reference_points:
            points = reference_points(base_path, rewards["svm"], judge, pixels_a, labels_a, args.reference_points,
                                      args.validation_seeds)
            print(json.dumps({"seed": seed, "reference_points": points}), flush=True)
        pairs, agreement = {}, {}  # agreement: share of pairs whose chosen image the judge also scores higher
        for text in args.settings:
            reward, method, settings, online_config = parse_setting(text, defaults)
            online = method != "offline"
            key = (reward, settings.groups_per_digit, settings.images_per_group)
            if not online and key not in pairs:
                pairs[key] = demo.ai_feedback_pairs(base_path, rewards[reward], settings, seed)
                chosen = judge(pairs[key]["chosen"], pairs[key]["prompt"])
                rejected = judge(pairs[key]["rejected"], pairs[key]["prompt"])
                agreement[key] = float(np.mean(np.array(chosen) > np.array(rejected)))
            for dpo_seed in args.dpo_seeds:
                output_dir = os.path.join(work_dir, "lora")
                if method == "grpo":
                    trainer = demo.grpo_trainer(base_path, rewards[reward], settings, seed + dpo_seed, output_dir,
                                                disable_tqdm=True, **online_config)
                elif method == "nft":
                    trainer = demo.nft_trainer(base_path, rewards[reward], settings, seed + dpo_seed, output_dir,
                                               disable_tqdm=True, **online_config)
                    trainer.add_callback(_CPUSeconds())  # the cost axis of "reward reached" (docs/nft.md)
                elif online:
                    trainer = demo.online_dpo_trainer(base_path, rewards[reward], settings, seed + dpo_seed,
                                                      output_dir, disable_tqdm=True, **online_config)
                else:
                    trainer = demo.dpo_trainer(base_path, pairs[key], settings, seed + dpo_seed, output_dir,
                                               disable_tqdm=True, **online_config)
                start, cpu_start = time.perf_counter(), time.process_time()
                trainer.train()
                train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
                result = evaluate_win_rate(trainer.pipeline, None, demo.PROMPTS, judge, seeds, return_images=True,
                                           batch_size=settings.batch_size, **demo.sampling_kwargs(settings))
                prompts = [c["prompt"] for c in result["comparisons"]]
                base = demo.judged_statistics(judge, result["reference_images"], prompts)
                dpo = demo.judged_statistics(judge, result["images"], prompts)
                reward_win_rate = demo.reward_win_rate(
                    rewards[reward], result["images"], result["reference_images"], prompts
                )
                row = {"setting": text, "seed": seed, "dpo_seed": dpo_seed, "win_rate": result["win_rate"],
                       "accuracy": [base["accuracy"], dpo["accuracy"]],
                       "diversity": [base["diversity"], dpo["diversity"]], "reward_model_win_rate": reward_win_rate,
                       "pair_judge_agreement": agreement.get(key) if not online else None,
                       "images_sampled": demo.images_sampled(settings, online), "train_s": round(train_s, 1),
                       "train_cpu_s": round(train_cpu_s, 1),
                       **demo.winner_error_change(trainer.state.log_history)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.log_dir:
                    os.makedirs(args.log_dir, exist_ok=True)
                    name = f"{text.replace('=', '-').replace(',', '_')}_split{seed}_dpo{dpo_seed}.json"
                    with open(os.path.join(args.log_dir, name), "w", encoding="utf-8") as f:
                        json.dump({**row, "log_history": trainer.state.log_history}, f, indent=1)
    if not args.settings:
        return rows
    print("\n| setting | judged win rates (validation) | mean | min | judge accuracy base -> DPO | diversity "
          "| judge agrees with pair labels |")
    print("|---|---|---|---|---|---|---|")
    for text in args.settings:
        runs = [r for r in rows if r["setting"] == text]
        wins = [r["win_rate"] for r in runs]
        acc, div = np.mean([r["accuracy"] for r in runs], 0), np.mean([r["diversity"] for r in runs], 0)
        agree = sorted({r["pair_judge_agreement"] for r in runs if r["pair_judge_agreement"] is not None})
        print(f"| `{text}` | {', '.join(f'{w:.1%}' for w in wins)} | {np.mean(wins):.1%} | {min(wins):.1%} | "
              f"{acc[0]:.1%} -> {acc[1]:.1%} | {div[0]:.2f} -> {div[1]:.2f} | {', '.join(f'{a:.1%}' for a in agree)} |")
    return rows


if __name__ == "__main__":
    main()
