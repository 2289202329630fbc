"""What the digits demo (digits_alignment.py) and its validation sweep (benchmarks/digits_sweep.py) share: the data
split, the base model, the reward model and judge, AI feedback, the DPO trainers and the judged statistics.

A module beside the demo, not part of the library: the demo imports it as a sibling script, the sweep puts examples/
on its path.
"""

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import dataclasses
from dataclasses import dataclass, replace

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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, TrainingArguments

from diffusion_dpo_trainer import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    DiffusionOnlineDPOConfig,
    DiffusionOnlineDPOTrainer,
)
from diffusion_dpo_trainer.families.flow import FlowMatchingFamily
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
    # all (the offline pairs are built from groups_per_digit * 10 * images_per_group), paired by
    # `online_pair_strategy` (DiffusionOnlineDPOConfig's `pair_strategy`).
    online_iterations: int = 10
    online_pair_strategy: str = "best_vs_worst"
    # --nft: the same rollout budget as --online (every `online_iterations` steps, `dpo_batch_size` prompts x
    # `images_per_group` images), each image trained at `nft_timesteps` of the sampler's timesteps per step (the paper
    # trains 9 of 10; fewer keeps a step's cost near online DPO's), with DiffusionNFT's published nft_beta and KL
    # weight, `nft_learning_rate` and advantages normalised by `nft_scale_rewards` (DiffusionNFTConfig's
    # `scale_rewards`; the paper's is "batch").
    nft_timesteps: int = 2
    nft_beta: float = 1.0
    nft_kl_weight: float = 1e-4
    nft_learning_rate: float = 5e-4
    nft_scale_rewards: str = "batch"
    # --grpo: groups of `images_per_group` sampled with DDIM eta 1 for `dpo_batch_size` prompts every
    # `online_iterations` steps, as --online; only a window of `grpo_window` steps is stochastic and trained, from the
    # first step ("fixed") or sliding by one step every `grpo_window_shift_every` optimizer steps ("sliding",
    # MixGRPO), KL weight `grpo_beta`.
    grpo_window: int = 4
    grpo_window_mode: str = "sliding"
    grpo_window_shift_every: int = 10
    grpo_beta: float = 0.0
    grpo_init_same_noise: bool = False  # DiffusionGRPOConfig's init_same_noise: one initial noise per group
    # The base model: "epsilon" (SD UNet, epsilon prediction, DDIM) or "flow" (SD3 transformer, rectified flow,
    # Euler: digits_flow.py); unet_steps are the denoiser's pretraining steps either way.
    base: str = "epsilon"


# The reward model and DPO strength were chosen with benchmarks/digits_sweep.py on other data splits (--seed 3, 4) and
# validation sampling seeds, never on the held-out seeds this demo reports (docs/alignment-demo.md).
FULL = Settings(vae_steps=200, unet_steps=800, groups_per_digit=48, images_per_group=4, dpo_steps=300, eval_seeds=40)
# --online: a smaller beta, fresh samples every 5 steps and every pair of a group (chosen with digits_sweep.py on splits
# 3 and 4: docs/online-dpo.md); it samples 3840 images to train on, twice what the offline pairs are built from.
FULL_ONLINE = replace(FULL, beta=1000.0, online_iterations=5, online_pair_strategy="all_pairs")
# --nft: online DPO's sampling budget (3840 images: new samples every 5 steps); DiffusionNFT's published nft_beta, 2 of
# the 20 sampler timesteps per image and step; advantages scaled per group (TRL's default; the paper's whole-batch std
# leaves little signal in a group of already correct digits), KL weight 10 (the published 1e-4 is for velocities and
# does not act on this noise prediction) and learning rate 3e-4. Chosen with digits_sweep.py on splits 3 and 4
# (docs/nft.md): the untuned 5e-4 over-optimised (diversity 0.73 x real); the KL kept diversity at the real digits'.
FULL_NFT = replace(FULL, online_iterations=5, nft_learning_rate=3e-4, nft_scale_rewards="group", nft_kl_weight=10.0)
# --grpo: chosen with digits_sweep.py on split 3 (8 runs) and checked on split 4 (docs/grpo.md): fresh samples every
# step (num_iterations 1, Flow-GRPO's), 60 steps so that it samples --online's 3840 images, the window of 4 stochastic
# (trained) steps fixed at the first, high-noise steps, learning rate 1e-3 and KL 0.01 (Flow-GRPO's PickScore beta).
# Sample reuse with a sliding window and lr 5e-4 left the reward flat; without the KL, diversity fell further.
FULL_GRPO = replace(FULL, online_iterations=1, dpo_steps=60, dpo_learning_rate=1e-3, grpo_window_mode="fixed",
                    grpo_beta=0.01)
QUICK = Settings(vae_steps=20, unet_steps=40, groups_per_digit=2, images_per_group=4, dpo_steps=4, eval_seeds=4,
                 inference_steps=4, batch_size=32, dpo_batch_size=4, online_iterations=2, grpo_window=2,
                 grpo_window_shift_every=1)
# --base flow: DPO's beta is the epsilon base's times E[(1 - s)^2] ~ 0.29 (s = sigmoid of a standard normal: SD3's
# logit-normal draw at shift 1), since a velocity error is an epsilon error over 1 - s; carried over, not tuned.
FLOW = replace(FULL, base="flow", beta=750.0)
FLOW_ONLINE = replace(FULL_ONLINE, base="flow", beta=300.0)
FLOW_GRPO = replace(FULL_GRPO, base="flow")  # Flow-SDE (noise level 0.7) with the epsilon base's settings: untuned
# --base flow --nft: the epsilon base's first chosen settings (learning rate 2e-4, per-group advantages, the published
# KL weight 1e-4), untuned on this base: its held-out figures in docs/nft.md were measured with these.
FLOW_NFT = replace(FULL_NFT, base="flow", nft_learning_rate=2e-4, nft_kl_weight=1e-4)
FLOW_QUICK = replace(QUICK, base="flow")


def settings_for(base: str, quick: bool = False, online: bool = False, grpo: bool = False, nft: bool = False) -> Settings:
    if base == "flow":
        return (FLOW_QUICK if quick else FLOW_ONLINE if online else FLOW_GRPO if grpo else FLOW_NFT if nft
                else FLOW)
    return QUICK if quick else FULL_ONLINE if online else FULL_GRPO if grpo else FULL_NFT if nft else FULL


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
def make_text_encoder(seed: int, projection_dim: int | None = None):
    """A 2-layer CLIP text encoder and its tokenizer; with `projection_dim`, the variant with a pooled projection that
    SD3 reads (the flow base of digits_flow.py)."""
    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer(scratch, vocab_words=["a", "handwritten", "digit"])
        # Prompts are 6 tokens with BOS/EOS: a context of 8 keeps cross-attention cheap.
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=8)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return tokenizer, model.eval().requires_grad_(False)


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


def build_base_pipeline(path, pixels, labels, settings: Settings, seed: int, log, on_step=None,
                        cache_dir: str | None = None) -> dict:
    """Pretrain the base model on `pixels` and save it at `path`; returns the pretraining losses.

    `cache_dir` keeps pretrained bases keyed by all that determines them (the data, the seed, the pretraining settings
    and the source of the pretraining functions): a hit is copied to `path` instead of pretraining again. Pretraining
    is deterministic (the same seed gives the same weights, bit for bit), so a run with a hit reports what a run
    without one does, only faster; runs that compare methods on one seed then pretrain once."""
    if cache_dir is None or on_step is not None:
        return _pretrain_base_pipeline(path, pixels, labels, settings, seed, log, on_step)
    entry = os.path.join(cache_dir, base_cache_key(pixels, labels, settings, seed))
    if not os.path.isfile(os.path.join(entry, "losses.json")):
        building = f"{entry}.building-{os.getpid()}"
        losses = _pretrain_base_pipeline(os.path.join(building, "base-pipeline"), pixels, labels, settings, seed, log,
                                         None)
        with open(os.path.join(building, "losses.json"), "w") as f:
            json.dump(losses, f)
        try:
            os.rename(building, entry)  # atomic: a concurrent run that finished first keeps its (identical) entry
        except OSError:
            shutil.rmtree(building)
    print(f"base model: {entry} (cached pretraining)", flush=True)
    shutil.copytree(os.path.join(entry, "base-pipeline"), path, dirs_exist_ok=True)
    with open(os.path.join(entry, "losses.json")) as f:
        return json.load(f)


def base_cache_key(pixels, labels, settings: Settings, seed: int) -> str:
    import digits_flow  # a sibling module that imports this one

    code = [train_vae, train_unet, make_text_encoder, _pretrain_base_pipeline, digits_flow]
    digest = hashlib.sha256()
    for part in (pixels.numpy().tobytes(), np.asarray(labels).tobytes(), *(inspect.getsource(c) for c in code),
                 repr((settings.base, settings.vae_steps, settings.unet_steps, settings.batch_size, seed))):
        digest.update(part if isinstance(part, bytes) else part.encode())
    return f"{settings.base}-seed{seed}-{digest.hexdigest()[:16]}"


def _pretrain_base_pipeline(path, pixels, labels, settings: Settings, seed: int, log, on_step=None) -> dict:
    if settings.base == "flow":
        from digits_flow import build_flow_pipeline  # a sibling module that imports this one

        return build_flow_pipeline(path, pixels, labels, settings, seed, log, on_step)
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
    if settings.base == "flow":  # both streams' attention (the SD3 family's default) and the image feed-forward
        targets = [*FlowMatchingFamily.lora_target_modules, "ff.net.0.proj", "ff.net.2"]
    else:
        targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, init_lora_weights="gaussian",
                      target_modules=targets)


def dpo_option(text: str) -> tuple[str, object]:
    """`KEY=VALUE` for one of DiffusionDPOConfig's own scalar fields (e.g. `winner_preserving_mu=0.9`,
    `soft_labels=smpo`, `curriculum_stages=3`, `beta=25000`), the value converted to the field's type; ValueError
    otherwise. The demo routes `beta` to its Settings (the sweep reads it as a Settings field first)."""
    key, _, value = text.partition("=")
    own = {f.name for f in dataclasses.fields(DiffusionDPOConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults = {f.name: f.default for f in dataclasses.fields(DiffusionDPOConfig) if f.name in own}
    default = defaults.get(key, dataclasses.MISSING)
    if not value or (default is not None and not isinstance(default, (bool, int, float, str))):
        raise ValueError(f"{text!r}: expected KEY=VALUE with KEY one of DiffusionDPOConfig's scalar fields "
                         f"{sorted(k for k, v in defaults.items() if v is None or isinstance(v, (bool, int, float, str)))}.")
    kind = float if default is None else type(default)
    return key, value in ("1", "true", "True") if kind is bool else kind(value)


def setting_option(text: str) -> tuple[str, object]:
    """`KEY=VALUE` for one of the demo's `Settings` fields (e.g. `online_iterations=10`, `dpo_steps=30`,
    `nft_kl_weight=1`), the value converted to the field's type; ValueError otherwise."""
    key, _, value = text.partition("=")
    kinds = {f.name: f.type for f in dataclasses.fields(Settings)}
    if key not in kinds or not value:
        raise ValueError(f"{text!r}: expected KEY=VALUE with KEY one of the demo's settings {sorted(kinds)}.")
    kind = {int: int, "int": int, str: str, "str": str, bool: bool, "bool": bool}.get(kinds[key], float)
    if kind is bool:
        if value not in ("0", "1", "true", "false", "True", "False"):
            raise ValueError(f"{text!r}: {key} takes 0/1 or true/false.")
        return key, value in ("1", "true", "True")
    try:
        return key, kind(value)
    except ValueError:
        raise ValueError(f"{text!r}: {key} takes {kind.__name__} values.") from None


def winner_error_change(log_history: list) -> dict:
    """The policy's error minus the reference's on the training pairs' winners and losers, averaged over the last
    third of the logs: > 0 for the winners is the failure Diffusion-SDPO targets (the preferred images' likelihood
    falls while the margin grows)."""
    logs = [h for h in log_history if "mse/chosen" in h and "ref_mse/chosen" in h]
    late = logs[len(logs) - max(len(logs) // 3, 1):]
    return {f"{side}_mse_change": float(np.mean([h[f"mse/{key}"] - h[f"ref_mse/{key}"] for h in late])) if late
            else None for side, key in (("winner", "chosen"), ("loser", "rejected"))}


def dpo_trainer(base_path, pairs, settings: Settings, seed: int, output_dir: str, **config) -> DiffusionDPOTrainer:
    args = DiffusionDPOConfig(**training_config(settings, seed, output_dir), **config)
    return DiffusionDPOTrainer(model=base_path, args=args, train_dataset=pairs, peft_config=lora_config(settings))


def online_dpo_trainer(base_path, reward, settings: Settings, seed: int, output_dir: str,
                       **config) -> DiffusionOnlineDPOTrainer:
    """On-policy DPO: every `online_iterations` steps, `images_per_group` policy samples for each of `dpo_batch_size`
    prompts, paired by the reward model (`online_pair_strategy`); the same LoRA and learning rate as offline."""
    args = DiffusionOnlineDPOConfig(
        **training_config(settings, seed, output_dir), num_images_per_prompt=settings.images_per_group,
        num_iterations=settings.online_iterations, **sampling_kwargs(settings),
        **{"pair_strategy": settings.online_pair_strategy, **config},
    )
    prompts = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return DiffusionOnlineDPOTrainer(model=base_path, reward_funcs=reward, args=args, train_dataset=prompts,
                                     peft_config=lora_config(settings))


def grpo_trainer(base_path, reward, settings: Settings, seed: int, output_dir: str, **config) -> DiffusionGRPOTrainer:
    """GRPO (DDIM with eta 1, DDPO's SD step): every `online_iterations` steps, `images_per_group` policy samples for
    each of `dpo_batch_size` prompts, advantages within each group from the reward model; the same LoRA and learning
    rate as DPO."""
    values = {**training_config(settings, seed, output_dir), "beta": settings.grpo_beta,
              "num_generations": settings.images_per_group, "num_iterations": settings.online_iterations,
              "num_inference_steps": settings.inference_steps, "eval_num_inference_steps": settings.inference_steps,
              "guidance_scale": 1.0, "sde_window_size": settings.grpo_window,
              "sde_window_mode": settings.grpo_window_mode, "sde_window_shift_every": settings.grpo_window_shift_every,
              "init_same_noise": settings.grpo_init_same_noise, **config}
    prompts = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return DiffusionGRPOTrainer(model=base_path, reward_funcs=reward, args=DiffusionGRPOConfig(**values),
                                train_dataset=prompts, peft_config=lora_config(settings))


def images_sampled(settings: Settings, online: bool) -> int:
    """The sampling budget: images drawn from a model to train on (pairs offline, policy groups online and NFT)."""
    if online:
        generations = -(-settings.dpo_steps // settings.online_iterations)
        return generations * settings.dpo_batch_size * settings.images_per_group
    return 10 * settings.groups_per_digit * settings.images_per_group


def nft_trainer(base_path, reward, settings: Settings, seed: int, output_dir: str, **config) -> DiffusionNFTTrainer:
    """DiffusionNFT: the online rollout budget, the sampler's own deterministic DDIM steps, no guidance, groups of
    `images_per_group` normalised into optimality weights; the same LoRA as the DPO runs."""
    values = {**training_config(settings, seed, output_dir), "beta": settings.nft_kl_weight,
              "learning_rate": settings.nft_learning_rate}
    args = DiffusionNFTConfig(
        **values, num_generations=settings.images_per_group, num_iterations=settings.online_iterations,
        nft_beta=settings.nft_beta, timestep_fraction=settings.nft_timesteps / settings.inference_steps,
        **{**sampling_kwargs(settings), "scale_rewards": settings.nft_scale_rewards, **config},
    )
    prompts = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return DiffusionNFTTrainer(model=base_path, reward_funcs=reward, args=args, train_dataset=prompts,
                               peft_config=lora_config(settings))


# ----- judged statistics -----------------------------------------------------------------------------------------
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


def score_win_rate(tuned: np.ndarray, base: np.ndarray) -> float:
    """Share of comparisons whose tuned score beats the base score, ties counting half (as evaluate_win_rate)."""
    return float(((tuned > base) + 0.5 * (tuned == base)).mean())


def reward_win_rate(reward: DigitProbability, dpo_images, base_images, prompts) -> float:
    """The same comparison scored by the reward model that labelled the pairs (what DPO optimised)."""
    return score_win_rate(np.array(reward(dpo_images, prompts)), np.array(reward(base_images, prompts)))
