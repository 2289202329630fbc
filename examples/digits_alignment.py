"""Diffusion-DPO end to end on real data, on a laptop CPU, with no download: does the aligned model win?

    python examples/digits_alignment.py                 # full run (a few minutes on 2 CPU cores)
    python examples/digits_alignment.py --quick         # smoke run (about a minute), numbers not meaningful
    python examples/digits_alignment.py --online        # on-policy DPO instead of pairs from the base model
    python examples/digits_alignment.py --nft           # DiffusionNFT (on-policy, forward process) instead
    python examples/digits_alignment.py --grpo          # GRPO (DDIM with eta) on the policy's own samples
    python examples/digits_alignment.py --base flow     # a flow-matching (SD3) base model instead (digits_flow.py)

Data: scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 1797 real 8x8 scans), split in two
stratified halves A and B.

1. Base model: a small latent text-to-image model built here (tiny VAE, tiny UNet, a small CLIP text encoder
   with a tokenizer written locally) and pretrained on half A, digits upscaled to 16 px, with prompts
   "a handwritten digit 7". It is saved as an ordinary `StableDiffusionPipeline`. With `--base flow`: a tiny SD3
   transformer (two small CLIP encoders, a tiny T5) pretrained with rectified flow on the same data with the
   same VAE recipe, saved as a `StableDiffusion3Pipeline` (digits_flow.py); everything below runs on it unchanged.
2. Reward model: a calibrated RBF-SVM classifier trained on half A; the reward of an image is its probability of
   the prompted digit. JUDGE: the same recipe trained on half B only. The judge never labels a pair, never sees a
   training image and never steers training; it only scores the final comparison.
3. AI feedback: `build_preference_pairs` samples several images per prompt from the base model and pairs the best
   against the worst by the reward model.
4. Diffusion-DPO with `DiffusionDPOTrainer` and a LoRA adapter; `RewardEvaluationCallback` tracks the reward-model
   win rate during training, and `RewardHackingCallback` the signals of reward hacking: the reward model's score and
   the judge's (held out: it only watches) on fixed prompts and seeds, within-prompt diversity and image statistics,
   with a warning if the reward rises while the judge falls or diversity halves (training_curves.png, last panel). With `--online`, steps 3 and 4 are one: `DiffusionOnlineDPOTrainer` samples groups from
   the policy being trained and pairs them by the same reward model as it goes (every pair of a group; each batch
   of samples serves `online_iterations` optimizer steps), with its own validated beta (`FULL_ONLINE`). With
   `--nft`, `DiffusionNFTTrainer` samples the same budget, turns each group's rewards into optimality weights and
   trains on the samples re-noised by the forward process (`FULL_NFT`; docs/nft.md). With
   `--grpo`, `DiffusionGRPOTrainer` samples the same groups with DDIM eta 1 and trains a sliding window of the
   denoising steps on their group-relative advantages under the same reward model (`FULL_GRPO`).
5. Evaluation on held-out seeds (never used for pairs): for every (prompt, seed) the judge scores the DPO sample
   and the base sample drawn from the same starting noise; `win_rate` counts ties as half a win. Also: mean judge
   score, per-digit accuracy (judge's argmax == prompted digit) and a diversity figure (mean pairwise pixel
   distance between samples of the same prompt) for both models.

Everything lands in --output-dir: report.json, samples.png (base vs DPO, same seeds), training_curves.png,
base-pipeline/ (a StableDiffusionPipeline) and dpo-lora/ (pytorch_lora_weights.safetensors), so that

    pipe = StableDiffusionPipeline.from_pretrained("digits-dpo/base-pipeline")
    pipe.load_lora_weights("digits-dpo/dpo-lora")

reproduces the DPO samples. On a CPU shared with other jobs, set OMP_NUM_THREADS to the cores you really have
(PyTorch's OpenMP threads slow down badly when they must wait for busy cores).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from diffusers import DiffusionPipeline
from digits_common import (
    EVAL_SEED_OFFSET,
    PROMPTS,
    SIZE,
    DigitProbability,
    ai_feedback_pairs,
    build_base_pipeline,
    digit_classifier,
    diversity,
    dpo_option,
    dpo_trainer,
    features,
    grpo_trainer,
    images_sampled,
    judged_statistics,
    load_halves,
    nft_trainer,
    online_dpo_trainer,
    pil_to_grey,
    winner_error_change,
    reward_win_rate,
    sampling_kwargs,
    setting_option,
    settings_for,
    wanted_digits,
)

from diffusion_dpo_trainer.evaluation import RewardEvaluationCallback, RewardHackingCallback, evaluate_win_rate


# ----- figures ------------------------------------------------------------------------------------------------------
def win_rate_by_base_correctness(judge: DigitProbability, base_images, prompts, outcomes) -> dict:
    """Where do the wins come from: comparisons whose base sample the judge already read as the right digit, or not."""
    correct = judge.classifier.classes_[judge.probabilities(base_images).argmax(1)] == wanted_digits(prompts)
    outcomes = np.array(outcomes)
    split = {}
    for name, mask in (("base_correct", correct), ("base_wrong", ~correct)):
        count = int(mask.sum())
        wins = (outcomes[mask] == "win").sum() + 0.5 * (outcomes[mask] == "tie").sum()
        split[name] = {"comparisons": count, "win_rate": float(wins / count) if count else None}
    return split


def real_diversity(pixels: torch.Tensor, labels: np.ndarray, per_digit: int) -> float:
    keep = np.concatenate([np.flatnonzero(labels == d)[:per_digit] for d in range(10)])
    return diversity(pixels[torch.from_numpy(keep)], labels[keep])


def save_sample_grid(path, base_images, dpo_images, seeds_per_digit: int, columns: int = 8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, seeds_per_digit)

    def panel(images):
        grey = pil_to_grey(images).numpy()
        rows = [np.concatenate([grey[d * seeds_per_digit + s] for s in range(columns)], axis=1) for d in range(10)]
        return np.concatenate(rows, axis=0)

    fig, axes = plt.subplots(1, 2, figsize=(1.2 + 1.2 * columns, 1.0 + 0.6 * 10))
    for ax, images, title in zip(axes, (base_images, dpo_images), ("base model", "after Diffusion-DPO (LoRA)")):
        ax.imshow(panel(images), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([(d + 0.5) * SIZE for d in range(10)], [f'"{d}"' for d in range(10)])
    fig.suptitle("held-out seeds: a DPO sample starts from the same noise as the base sample at the same place")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def save_training_curves(path, pretrain_losses: dict, log_history: list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for name, values in pretrain_losses.items():
        axes[0].plot(values, label=f"{name} loss", alpha=0.8)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("pretraining step")
    axes[0].set_title("base model pretraining")
    axes[0].legend()
    train = [h for h in log_history if "loss" in h and "rewards/accuracies" in h]
    steps = [h["step"] for h in train]
    axes[1].plot(steps, [h["loss"] for h in train], label="DPO loss")
    axes[1].plot(steps, [h["rewards/accuracies"] for h in train], label="implicit reward accuracy")
    axes[1].axhline(np.log(2), color="grey", ls=":", lw=1)
    axes[1].set_xlabel("DPO step")
    axes[1].set_title("Diffusion-DPO training")
    axes[1].legend()
    evals = [(0, 0.5)] + [(h["step"], h["eval_win_rate"]) for h in log_history if "eval_win_rate" in h]
    axes[2].plot(*zip(*evals), marker="o")
    axes[2].axhline(0.5, color="grey", ls=":", lw=1)
    axes[2].set_ylim(0, 1.02)
    axes[2].set_xlabel("DPO step")
    axes[2].set_title("win rate vs base by the reward model (callback)")
    signals = [h for h in log_history if "hacking/diversity" in h]
    for key, label in (("reward", "reward model"), ("heldout_reward", "judge (held out)"), ("diversity", "diversity"),
                       ("high_frequency_energy", "high-frequency energy"), ("grid_energy", "8 px grid energy")):
        axes[3].plot([h["step"] for h in signals], [h[f"hacking/{key}"] for h in signals], marker="o", label=label)
    axes[3].set_xlabel("DPO step")
    axes[3].set_title("reward hacking signals (callback)")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


# ----- the run ------------------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="digits-dpo", help="Where everything is written (default ./digits-dpo).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data split, models, pair sampling and DPO.")
    parser.add_argument("--quick", action="store_true", help="Tiny settings for CI: finishes in about a minute.")
    parser.add_argument("--online", action="store_true",
                        help="On-policy DPO (DiffusionOnlineDPOTrainer) instead of pairs sampled from the base model.")
    parser.add_argument("--nft", action="store_true",
                        help="DiffusionNFT (DiffusionNFTTrainer) on the policy's own samples instead of DPO.")
    parser.add_argument("--grpo", action="store_true",
                        help="GRPO (DiffusionGRPOTrainer) on the policy's own samples instead of DPO.")
    parser.add_argument("--groups-per-digit", type=int, default=None,
                        help="Offline: base-model sampling groups per digit for the AI-feedback pairs (default 48: "
                             "1920 images; 96 matches --online's 3840).")
    parser.add_argument("--base", choices=("epsilon", "flow"), default="epsilon",
                        help="The base model: a Stable Diffusion UNet with epsilon prediction (default) or a Stable "
                             "Diffusion 3 transformer trained with rectified flow.")
    parser.add_argument("--base-cache", default=None, metavar="DIR",
                        help="Keep pretrained base models here and reuse them: runs of several methods on one seed "
                             "pretrain once (pretraining is deterministic, so results are unchanged).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's choice).")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the demo's settings (digits_common.Settings; digits_sweep.py's names), "
                             "e.g. online_iterations=10 (--online/--nft: 1920 images), dpo_steps=30 (--grpo: 1920 "
                             "images); repeatable")
    parser.add_argument("--dpo-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a DiffusionDPOConfig field for offline DPO, e.g. winner_preserving_mu=0.9, "
                             "soft_labels=smpo, curriculum_stages=3 (docs/losses.md, Stabilisers) or beta=25000; "
                             "repeatable")
    args = parser.parse_args(argv)
    try:
        args.dpo_options = dict(dpo_option(text) for text in args.dpo_option)
        args.settings = dict(setting_option(text) for text in args.setting)
    except ValueError as exc:
        parser.error(str(exc))
    if "base" in args.settings:
        parser.error("--setting base=...: choose the base model with --base.")
    if args.dpo_options and (args.online or args.grpo or args.nft):
        parser.error("--dpo-option applies to offline DPO only (not with --online, --grpo or --nft).")
    if args.online + args.grpo + args.nft > 1:
        parser.error("--online, --grpo and --nft are three methods: choose one.")
    if args.groups_per_digit is not None and (args.online or args.grpo or args.nft or args.groups_per_digit < 1):
        parser.error("--groups-per-digit takes a positive number and applies to offline DPO only (not with --online, "
                     "--grpo or --nft).")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = settings_for(args.base, args.quick, args.online, args.grpo, args.nft)
    if args.groups_per_digit:
        settings = replace(settings, groups_per_digit=args.groups_per_digit)
    settings = replace(settings, **args.settings)
    dpo_options = dict(args.dpo_options)
    if "beta" in dpo_options:  # DPO's strength is a Settings field, passed to the config with the others
        settings = replace(settings, beta=dpo_options.pop("beta"))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    base_path = os.path.join(args.output_dir, "base-pipeline")
    lora_path = os.path.join(args.output_dir, "dpo-lora")
    timings, start = {}, time.perf_counter()

    def log(stage, step, total, loss):
        if step % max(total // 5, 1) == 0 or step == total - 1:
            print(f"[{stage}] step {step + 1}/{total} loss {loss:.4f}", flush=True)

    def lap(name):
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 1)

    # (a) data and base model
    (pixels_a, labels_a), (pixels_b, labels_b) = load_halves(args.seed)
    pretrain_losses = build_base_pipeline(base_path, pixels_a, labels_a, settings, args.seed, log,
                                          cache_dir=args.base_cache)
    lap("pretrain_base_model")

    # (b) reward model on half A, judge on half B
    reward, judge = digit_classifier(pixels_a, labels_a), digit_classifier(pixels_b, labels_b)
    classifier_accuracy = {
        "reward_model_on_half_b": float(reward.classifier.score(features(pixels_b), labels_b)),
        "judge_on_half_a": float(judge.classifier.score(features(pixels_a), labels_a)),
    }
    lap("classifiers")

    # (c) AI-feedback pairs from the base model, labelled by the reward model (online: sampled while training)
    sampling = sampling_kwargs(settings)
    if args.online:
        trainer = online_dpo_trainer(base_path, reward, settings, args.seed, lora_path)
    elif args.nft:
        trainer = nft_trainer(base_path, reward, settings, args.seed, lora_path)
    elif args.grpo:
        trainer = grpo_trainer(base_path, reward, settings, args.seed, lora_path)
    else:
        pairs = ai_feedback_pairs(base_path, reward, settings, args.seed)
        gaps = np.array(pairs["chosen_score"]) - np.array(pairs["rejected_score"])
        lap("build_pairs")
        # (d) Diffusion-DPO with LoRA
        trainer = dpo_trainer(base_path, pairs, settings, args.seed, lora_path, **dpo_options)
    monitor = RewardEvaluationCallback(
        trainer, PROMPTS, reward, seeds=[EVAL_SEED_OFFSET - 1 - s for s in range(4)],
        eval_steps=max(settings.dpo_steps // 5, 2), batch_size=settings.batch_size, **sampling,
    )
    trainer.add_callback(monitor)
    hacking = RewardHackingCallback(
        trainer, PROMPTS, reward, heldout_reward_fn=judge, seeds=[EVAL_SEED_OFFSET - 1 - s for s in range(4)],
        eval_steps=max(settings.dpo_steps // 5, 2), batch_size=settings.batch_size, **sampling,
    )
    trainer.add_callback(hacking)
    trainer.train()
    trainer.save_model()
    lap("dpo_training")

    # (e) judged comparison on held-out seeds, with the LoRA loaded the way a user loads it
    pipe = DiffusionPipeline.from_pretrained(base_path)
    pipe.load_lora_weights(lora_path)
    seeds = [EVAL_SEED_OFFSET + args.seed * 10_000 + s for s in range(settings.eval_seeds)]
    result = evaluate_win_rate(pipe, None, PROMPTS, judge, seeds, batch_size=settings.batch_size,
                               return_images=True, **sampling)
    flat_prompts = [c["prompt"] for c in result["comparisons"]]
    dpo_images, base_images = result.pop("images"), result.pop("reference_images")
    outcomes = [c["outcome"] for c in result["comparisons"]]
    lap("evaluation")

    save_sample_grid(os.path.join(args.output_dir, "samples.png"), base_images, dpo_images, settings.eval_seeds)
    save_training_curves(os.path.join(args.output_dir, "training_curves.png"), pretrain_losses,
                         trainer.state.log_history)
    lap("figures")

    report = {
        "win_rate": result["win_rate"],
        "wins": result["wins"],
        "losses": result["losses"],
        "ties": result["ties"],
        "num_comparisons": result["num_comparisons"],
        "win_rate_by_base_sample": win_rate_by_base_correctness(judge, base_images, flat_prompts, outcomes),
        "judge": {
            "base": judged_statistics(judge, base_images, flat_prompts),
            "dpo": judged_statistics(judge, dpo_images, flat_prompts),
        },
        # The same diversity figure on real scans of half B (as many per digit as samples per prompt).
        "real_digits_diversity": real_diversity(pixels_b, labels_b, settings.eval_seeds),
        "reward_model_win_rate": reward_win_rate(reward, dpo_images, base_images, flat_prompts),
        "reward_model_win_rate_during_training": [
            [h["step"], h["eval_win_rate"]] for h in trainer.state.log_history if "eval_win_rate" in h
        ],
        "classifier_accuracy": classifier_accuracy,
        "reward_hacking": {"signals": hacking.history, "alerts": hacking.alerts},
        **(online_figures(trainer.state.log_history) if args.online else
           grpo_figures(trainer.state.log_history) if args.grpo else nft_figures(trainer.state.log_history) if args.nft
           else {"num_pairs": len(pairs), "mean_pair_reward_gap": float(gaps.mean()) if len(gaps) else 0.0}),
        "images_sampled": images_sampled(settings, args.online or args.grpo or args.nft),
        "dpo_options": args.dpo_options,
        "base_cache": args.base_cache,  # set: the base was copied from (or added to) this cache, not pretrained here
        **winner_error_change(trainer.state.log_history),
        "mode": "online" if args.online else "grpo" if args.grpo else "nft" if args.nft else "offline",
        "seed": args.seed,
        "quick": args.quick,
        "settings": asdict(settings),
        # process CPU time: with one thread, the wall time the run takes on an idle core, whatever else the machine runs
        "timings_s": {**timings, "total": round(time.perf_counter() - start, 1),
                      "cpu": round(time.process_time(), 1)},
        "torch_threads": torch.get_num_threads(),
        "files": {"base_pipeline": "base-pipeline", "lora": "dpo-lora", "samples": "samples.png",
                  "training_curves": "training_curves.png"},
    }
    with open(os.path.join(args.output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print_summary(report)
    return report


def online_figures(log_history: list) -> dict:
    """Pairs and reward gaps of an online run, from what the trainer logged while sampling."""
    logged = [h for h in log_history if "objective/scores" in h]
    return {
        "mean_pair_reward_gap": float(np.mean([h["objective/scores_margin"] for h in logged
                                               if "objective/scores_margin" in h])),
        "no_pair_fraction": float(np.mean([h["objective/no_pair_fraction"] for h in logged])),
        "reward_model_score_while_training": [[h["step"], h["objective/scores"]] for h in logged],
        "sampling_s": round(logged_total(log_history, "time/generation"), 1),
        "training_s": round(logged_total(log_history, "time/training"), 1),
    }


def nft_figures(log_history: list) -> dict:
    """The reward model's score of the rollouts and the time split of an NFT run, from what the trainer logged."""
    return {
        "reward_model_score_while_training": [[h["step"], h["reward"]] for h in log_history if "reward" in h],
        "sampling_s": round(logged_total(log_history, "time/sampling"), 1),
        "rewards_s": round(logged_total(log_history, "time/rewards"), 3),
        "training_s": round(logged_total(log_history, "time/training"), 1),
    }


def grpo_figures(log_history: list) -> dict:
    """The reward of the groups sampled while training and the time split of a GRPO run, from the trainer's log."""
    logged = [h for h in log_history if "reward" in h]
    return {
        "reward_model_score_while_training": [[h["step"], h["reward"]] for h in logged],
        "frac_reward_zero_std": float(np.mean([h["frac_reward_zero_std"] for h in logged])),
        "sampling_s": round(logged_total(log_history, "time/sampling"), 1),
        "rewards_s": round(logged_total(log_history, "time/rewards"), 1),
        "training_s": round(logged_total(log_history, "time/training"), 1),
    }


def logged_total(log_history: list, key: str) -> float:
    """The sum over steps of a per-step figure the trainer logs as a mean over each logging window."""
    total, previous = 0.0, 0
    for entry in log_history:
        if key in entry:
            total += entry[key] * (entry["step"] - previous)
            previous = entry["step"]
    return total


def print_summary(report: dict) -> None:
    base, dpo = report["judge"]["base"], report["judge"]["dpo"]
    print("\n=== Diffusion-DPO on handwritten digits ===")
    print(f"judged win rate of DPO over base: {report['win_rate']:.1%} "
          f"({report['wins']} wins, {report['losses']} losses, {report['ties']} ties "
          f"of {report['num_comparisons']} held-out comparisons; ties count half)")
    print(f"reward-model win rate (what DPO optimised): {report['reward_model_win_rate']:.1%}")
    print(f"{'':22s}{'base':>10s}{'DPO':>10s}")
    print(f"{'mean judge score':22s}{base['mean_judge_score']:10.3f}{dpo['mean_judge_score']:10.3f}")
    print(f"{'judge accuracy':22s}{base['accuracy']:10.1%}{dpo['accuracy']:10.1%}")
    print(f"{'diversity':22s}{base['diversity']:10.3f}{dpo['diversity']:10.3f}"
          f"   (real digits: {report['real_digits_diversity']:.3f})")
    split = report["win_rate_by_base_sample"]
    for name, label in (("base_wrong", "judge read the base sample as another digit"),
                        ("base_correct", "judge read the base sample as the right digit")):
        if split[name]["comparisons"]:
            print(f"win rate where the {label}: {split[name]['win_rate']:.1%} of {split[name]['comparisons']}")
    print(f"reward-hacking alerts: {report['reward_hacking']['alerts'] or 'none'}")
    method = {"grpo": "GRPO", "nft": "DiffusionNFT"}.get(report["mode"], f"{report['mode']} DPO")
    print(f"{method}; images sampled to train on: {report['images_sampled']}; "
          f"time: {report['timings_s']['total']:.0f} s {report['timings_s']}")


if __name__ == "__main__":
    main(sys.argv[1:])
