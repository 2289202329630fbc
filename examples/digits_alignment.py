"""Diffusion-DPO end to end on real data, on a laptop CPU, with no download: does the aligned model win?

    python examples/digits_alignment.py                 # full run (a few minutes on 2 CPU cores)
    python examples/digits_alignment.py --quick         # smoke run (about a minute), numbers not meaningful
    python examples/digits_alignment.py --online        # on-policy DPO instead of pairs from the base model

Data: scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 1797 real 8x8 scans), split in two
stratified halves A and B.

1. Base model: a small latent text-to-image model built here (tiny VAE, tiny UNet, a small CLIP text encoder
   with a tokenizer written locally) and pretrained on half A, digits upscaled to 16 px, with prompts
   "a handwritten digit 7". It is saved as an ordinary `StableDiffusionPipeline`.
2. Reward model: a calibrated RBF-SVM classifier trained on half A; the reward of an image is its probability of
   the prompted digit. JUDGE: the same recipe trained on half B only. The judge never labels a pair, never sees a
   training image and never steers training; it only scores the final comparison.
3. AI feedback: `build_preference_pairs` samples several images per prompt from the base model and pairs the best
   against the worst by the reward model.
4. Diffusion-DPO with `DiffusionDPOTrainer` and a LoRA adapter; `RewardEvaluationCallback` tracks the reward-model
   win rate during training. With `--online`, steps 3 and 4 are one: `DiffusionOnlineDPOTrainer` samples groups from
   the policy being trained and pairs them by the same reward model as it goes, for the same number of sampled
   images (each batch of samples is reused for `online_iterations` optimizer steps).
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
import tempfile
import time
from dataclasses import asdict, dataclass

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusion_dpo_trainer import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionOnlineDPOConfig,
    DiffusionOnlineDPOTrainer,
)
from diffusion_dpo_trainer.evaluation import RewardEvaluationCallback, evaluate_win_rate
from diffusion_dpo_trainer.feedback import build_preference_pairs
from diffusion_dpo_trainer.testing import write_clip_tokenizer

PROMPT = "a handwritten digit {}"
PROMPTS = [PROMPT.format(d) for d in range(10)]
SIZE = 16  # pixels; the VAE halves it, so the UNet works on 4x8x8 latents
EVAL_SEED_OFFSET = 10**9  # evaluation seeds never overlap the seeds used to sample pairs


@dataclass
class Settings:
    vae_steps: int
    unet_steps: int
    groups_per_digit: int  # independent sampling groups per digit for AI feedback
    images_per_group: int
    dpo_steps: int
    eval_seeds: int  # held-out seeds per digit for the judged comparison
    inference_steps: int = 20
    batch_size: int = 64
    dpo_batch_size: int = 16
    beta: float = 2500.0
    dpo_learning_rate: float = 5e-4
    lora_rank: int = 8
    # --online: samples are drawn every `online_iterations` optimizer steps for `dpo_batch_size` prompts,
    # `images_per_group` images each: (dpo_steps / online_iterations) * dpo_batch_size * images_per_group images in
    # all, as many as the offline pairs are built from (groups_per_digit * 10 * images_per_group).
    online_iterations: int = 10


# The reward model and DPO strength were chosen with benchmarks/digits_sweep.py on other data splits (--seed 3, 4) and
# validation sampling seeds, never on the held-out seeds this demo reports (docs/alignment-demo.md).
FULL = Settings(vae_steps=200, unet_steps=800, groups_per_digit=48, images_per_group=4, dpo_steps=300, eval_seeds=40)
QUICK = Settings(vae_steps=20, unet_steps=40, groups_per_digit=2, images_per_group=4, dpo_steps=4, eval_seeds=4,
                 inference_steps=4, batch_size=32, dpo_batch_size=4, online_iterations=2)


# ----- data ---------------------------------------------------------------------------------------------------------
def load_halves(seed: int):
    """Two stratified halves of load_digits: A trains the generator and the reward model, B only the judge."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float() / 16.0  # (N, 8, 8) in [0, 1]
    upscaled = F.interpolate(images[:, None], size=SIZE, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    a, b = train_test_split(np.arange(len(images)), test_size=0.5, stratify=digits.target, random_state=seed)
    return (upscaled[a], digits.target[a]), (upscaled[b], digits.target[b])


def features(images: torch.Tensor) -> np.ndarray:
    """Classifier input: 16 px grey images in [0, 1] pooled back to the 8x8 grid of the original scans."""
    return F.avg_pool2d(images[:, None], 2).flatten(1).numpy()


def pil_to_grey(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images]))


class DigitProbability:
    """A reward function: the classifier's probability that the image shows the digit named in the prompt."""

    def __init__(self, classifier):
        self.classifier = classifier

    def probabilities(self, images) -> np.ndarray:
        return self.classifier.predict_proba(features(pil_to_grey(images)))

    def __call__(self, images, prompts) -> list[float]:
        probs = self.probabilities(images)
        digits = [int(p.rsplit(" ", 1)[-1]) for p in prompts]
        return [float(probs[i, self.classifier.classes_.tolist().index(d)]) for i, d in enumerate(digits)]


def digit_classifier(pixels: torch.Tensor, labels: np.ndarray) -> DigitProbability:
    """The recipe of both the reward model (on half A) and the judge (on half B): the same model, disjoint data."""
    return DigitProbability(CalibratedClassifierCV(SVC(), ensemble=False).fit(features(pixels), labels))


# ----- the base text-to-image model ---------------------------------------------------------------------------------
def make_text_encoder(seed: int):
    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer(scratch, vocab_words=["a", "handwritten", "digit"])
        # Prompts are 6 tokens with BOS/EOS: a context of 8 keeps cross-attention cheap.
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=8)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModel(config).eval().requires_grad_(False)


def train_vae(pixels: torch.Tensor, steps: int, batch_size: int, seed: int, log) -> tuple[AutoencoderKL, list]:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=SIZE,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1), pct_start=0.1)
    losses = []
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (batch_size,))]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        log("vae", step, steps, loss.item())
    vae.eval().requires_grad_(False)
    # Like Stable Diffusion: scale latents to unit variance for the UNet.
    with torch.no_grad():
        std = vae.encode(pixels[:512]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, losses


def train_unet(vae, text_encoder, prompt_ids, pixels, labels, scheduler, steps, batch_size, seed, log, on_step=None):
    """Epsilon-prediction denoising on VAE latents; the text encoder learns with the UNet, so the digit token
    matters from the start instead of being a faint difference in a random encoder's output."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, cross_attention_dim=text_encoder.config.hidden_size, norm_num_groups=16,
    )
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        mean, std = posterior.mean, posterior.std
    alphas = scheduler.alphas_cumprod
    text_encoder.train().requires_grad_(True)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=max(steps, 1), pct_start=0.05)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(pixels), (batch_size,))
        x0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * vae.config.scaling_factor
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        text_embeds = text_encoder(prompt_ids)[0]  # the 10 prompts once, then one row per sample
        loss = F.mse_loss(unet(noisy, t, text_embeds[labels[idx]]).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        log("unet", step, steps, loss.item())
        if on_step is not None:
            on_step(step, unet, text_encoder)
    text_encoder.eval().requires_grad_(False)
    return unet.eval(), losses


def build_base_pipeline(path, pixels, labels, settings: Settings, seed: int, log, on_step=None):
    tokenizer, text_encoder = make_text_encoder(seed)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    pixels3 = (pixels * 2 - 1)[:, None].repeat(1, 3, 1, 1)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    vae, vae_losses = train_vae(pixels3, settings.vae_steps, settings.batch_size, seed, log)
    unet, unet_losses = train_unet(
        vae, text_encoder, ids.input_ids, pixels3, torch.as_tensor(labels), scheduler, settings.unet_steps,
        settings.batch_size, seed, log, on_step,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return {"vae": vae_losses, "unet": unet_losses}


# ----- AI feedback and Diffusion-DPO -------------------------------------------------------------------------------
def sampling_kwargs(settings: Settings) -> dict:
    return {"num_inference_steps": settings.inference_steps, "guidance_scale": 1.0}


def ai_feedback_pairs(base_path, reward, settings: Settings, seed: int):
    """Best-vs-worst pairs by the reward model, from groups of base-model samples of each digit's prompt."""
    return build_preference_pairs(
        base_path, [p for p in PROMPTS for _ in range(settings.groups_per_digit)], reward,
        num_images_per_prompt=settings.images_per_group, strategy="best_vs_worst", seed=seed * 100_000,
        batch_size=settings.batch_size, **sampling_kwargs(settings),
    )


def training_config(settings: Settings, seed: int, output_dir: str) -> dict:
    """What offline and online DPO share: strength, steps, batch (pairs, or prompts giving one pair each), logging."""
    return dict(
        output_dir=output_dir, beta=settings.beta, resolution=SIZE, per_device_train_batch_size=settings.dpo_batch_size,
        max_steps=settings.dpo_steps, learning_rate=settings.dpo_learning_rate, lr_scheduler_type="constant",
        logging_steps=max(settings.dpo_steps // 15, 1), save_strategy="no", report_to="none", seed=seed,
        dataloader_pin_memory=False,
    )


def lora_config(settings: Settings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_rank, init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"],
    )


def dpo_trainer(base_path, pairs, settings: Settings, seed: int, output_dir: str, **config) -> DiffusionDPOTrainer:
    args = DiffusionDPOConfig(**training_config(settings, seed, output_dir), **config)
    return DiffusionDPOTrainer(model=base_path, args=args, train_dataset=pairs, peft_config=lora_config(settings))


def online_dpo_trainer(base_path, reward, settings: Settings, seed: int, output_dir: str,
                       **config) -> DiffusionOnlineDPOTrainer:
    """On-policy DPO: every `online_iterations` steps, `images_per_group` policy samples for each of `dpo_batch_size`
    prompts, best against worst by the reward model; the same LoRA, beta and learning rate as offline."""
    args = DiffusionOnlineDPOConfig(
        **training_config(settings, seed, output_dir), num_images_per_prompt=settings.images_per_group,
        num_iterations=settings.online_iterations, **sampling_kwargs(settings), **config,
    )
    prompts = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return DiffusionOnlineDPOTrainer(model=base_path, reward_funcs=reward, args=args, train_dataset=prompts,
                                     peft_config=lora_config(settings))


def images_sampled(settings: Settings, online: bool) -> int:
    """The sampling budget: images drawn from a model to train on (pairs offline, policy groups online)."""
    if online:
        generations = -(-settings.dpo_steps // settings.online_iterations)
        return generations * settings.dpo_batch_size * settings.images_per_group
    return 10 * settings.groups_per_digit * settings.images_per_group


# ----- figures ------------------------------------------------------------------------------------------------------
def wanted_digits(prompts) -> np.ndarray:
    return np.array([int(p.rsplit(" ", 1)[-1]) for p in prompts])


def diversity(grey: torch.Tensor, digits: np.ndarray) -> float:
    """Mean Euclidean distance between two images of the same digit (grey 16x16 pixels in [0, 1]), over digits."""
    return float(np.mean([torch.pdist(grey[torch.from_numpy(digits == d)].flatten(1)).mean().item() for d in range(10)]))


def judged_statistics(judge: DigitProbability, images, prompts) -> dict:
    wanted = wanted_digits(prompts)
    predicted = judge.classifier.classes_[judge.probabilities(images).argmax(1)]
    return {
        "mean_judge_score": float(np.mean(judge(images, prompts))),
        "accuracy": float((predicted == wanted).mean()),
        "per_digit_accuracy": {str(d): float((predicted[wanted == d] == d).mean()) for d in range(10)},
        "diversity": diversity(pil_to_grey(images), wanted),
    }


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


def reward_win_rate(reward: DigitProbability, dpo_images, base_images, prompts) -> float:
    """The same comparison scored by the reward model that labelled the pairs (what DPO optimised)."""
    dpo, base = np.array(reward(dpo_images, prompts)), np.array(reward(base_images, prompts))
    return float(((dpo > base).sum() + 0.5 * (dpo == base).sum()) / len(dpo))


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

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's choice).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
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
    pretrain_losses = build_base_pipeline(base_path, pixels_a, labels_a, settings, args.seed, log)
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
    else:
        pairs = ai_feedback_pairs(base_path, reward, settings, args.seed)
        gaps = np.array(pairs["chosen_score"]) - np.array(pairs["rejected_score"])
        lap("build_pairs")
        # (d) Diffusion-DPO with LoRA
        trainer = dpo_trainer(base_path, pairs, settings, args.seed, lora_path)
    monitor = RewardEvaluationCallback(
        trainer, PROMPTS, reward, seeds=[EVAL_SEED_OFFSET - 1 - s for s in range(4)],
        eval_steps=max(settings.dpo_steps // 5, 2), batch_size=settings.batch_size, **sampling,
    )
    trainer.add_callback(monitor)
    trainer.train()
    trainer.save_model()
    lap("dpo_training")

    # (e) judged comparison on held-out seeds, with the LoRA loaded the way a user loads it
    pipe = StableDiffusionPipeline.from_pretrained(base_path)
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
        **(online_figures(trainer.state.log_history) if args.online else {
            "num_pairs": len(pairs), "mean_pair_reward_gap": float(gaps.mean()) if len(gaps) else 0.0}),
        "images_sampled": images_sampled(settings, args.online),
        "mode": "online" if args.online else "offline",
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
    print(f"{report['mode']} DPO; images sampled to train on: {report['images_sampled']}; "
          f"time: {report['timings_s']['total']:.0f} s {report['timings_s']}")


if __name__ == "__main__":
    main(sys.argv[1:])
