"""Step time, throughput and peak memory of DiffusionDPOTrainer against a bare-PyTorch floor, measured side by side.

The floor does only the unavoidable work of one Diffusion-DPO step on the same model, optimizer and batch: encode
(unless cached), one policy forward+backward on the 2B winner/loser samples, one reference forward on the same 2B
samples, gradient clipping when configured, the optimizer step. The two are interleaved step by step inside one
`trainer.train()` call (a callback runs one floor step after each trainer step), so load from other processes hits
both alike; the ratio of their medians is the trainer's overhead.

Models are built from the public configs written out below with random weights (no download): the SD1.5 and SDXL
UNets at full size; text encoders with the real widths but 2 layers and a 4-level VAE with slim channels (the right
latent shapes at a fraction of the cost), since the benchmark measures the denoiser step. `--model tiny` uses the
test pipelines for smoke runs.

    python benchmarks/bench_step.py --model sd15 --resolution 256 --batch 1 --json out.json --markdown out.md

See benchmarks/README.md and docs/performance.md.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import fields

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, TrainerCallback

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer, PreferenceCollator, losses
from diffusion_dpo_trainer.testing import make_preference_dataset, make_sd_pipeline, write_clip_tokenizer

# runwayml/stable-diffusion-v1-5 unet/config.json (= stable-diffusion-v1-5/stable-diffusion-v1-5).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CACHING_FIELDS = ("precompute_latents", "precompute_text_embeddings")


# ----- models ----------------------------------------------------------------------------------------------------------
def _text_encoder(tokenizer, hidden_size, projection=False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        projection_dim=hidden_size, num_hidden_layers=2, num_attention_heads=hidden_size // 64,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _slim_vae(scaling_factor):
    """Four levels (scale factor 8, 4 latent channels) like the real VAE, with slim channels."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        scaling_factor=scaling_factor,
    )


def build_pipeline(model: str, workdir: str, dtype: torch.dtype):
    """A pipeline with randomly initialised weights; the UNet is built directly in `dtype` to halve peak memory."""
    if model == "tiny":
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(make_sd_pipeline(os.path.join(workdir, "tiny")))
    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(os.path.join(workdir, "tokenizer"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        unet = UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET))
    finally:
        torch.set_default_dtype(default)
    if model == "sd15":
        return StableDiffusionPipeline(
            vae=_slim_vae(0.18215), text_encoder=_text_encoder(tokenizer, 768), tokenizer=tokenizer, unet=unet,
            scheduler=DDPMScheduler(**SD_SCHEDULE, clip_sample=False), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=_slim_vae(0.13025), text_encoder=_text_encoder(tokenizer, 768),
        text_encoder_2=_text_encoder(tokenizer, 1280, projection=True), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading"),
        add_watermarker=False,
    )


# ----- the floor -------------------------------------------------------------------------------------------------------
class Floor:
    """One Diffusion-DPO step in plain PyTorch on the trainer's own denoiser, reference, optimizer and a fixed batch."""

    def __init__(self, trainer, batch, cached: bool):
        self.trainer, self.family, self.cached = trainer, trainer.family, cached
        self.device = trainer.accelerator.device
        self.denoiser = trainer.accelerator.unwrap_model(trainer.model)
        self.params = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
        dtype = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
        self.autocast = dict(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)
        self.pixels = torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]]).to(self.device)
        self.prompts = batch["prompt"]
        self.time_ids = self.family.time_conditioning(batch, trainer.resolution, self.device)
        if cached:  # what a cache holds: the latent distribution and the prompt embeddings
            with torch.autocast(**self.autocast):
                self.mean_std = self.family.encode_pixels(self.pixels)
                self.prompt_embeds = self.family.encode_prompt(self.prompts, self.device)

    def step(self) -> None:
        family, args = self.family, self.trainer.args
        with torch.autocast(**self.autocast):
            mean, std = self.mean_std if self.cached else family.encode_pixels(self.pixels)
            embeds = self.prompt_embeds if self.cached else family.encode_prompt(self.prompts, self.device)
            x0 = family.scale_latents(mean + std * torch.randn_like(mean))
            pairs = x0.shape[0] // 2
            conditioning = {k: torch.cat([v, v]) for k, v in embeds.items()} | self.time_ids
            noise = torch.randn_like(x0[:pairs]).repeat(2, 1, 1, 1)
            timesteps = family.sample_timesteps(pairs, self.device).repeat(2)
            noisy, target = family.noisy_latents_and_target(x0, noise, timesteps)
            policy = losses.per_sample_mse(family.predict(self.denoiser, noisy, timesteps, conditioning), target)
            with torch.no_grad(), family.reference() as reference:  # the library's one reference switch
                ref = losses.per_sample_mse(family.predict(reference, noisy, timesteps, conditioning), target)
            m_w, m_l = policy.chunk(2)
            r_w, r_l = ref.chunk(2)
            loss = losses.sigmoid_loss(m_w, m_l, r_w, r_l, self.trainer.loss_params).mean()
        loss.backward()
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ----- measurement -----------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Interleave(TrainerCallback):
    """Times each trainer step (everything between two step ends, floor excluded) and runs one floor step after it."""

    def __init__(self, make_floor, run_floor: bool):
        self.make_floor, self.run_floor = make_floor, run_floor
        self.floor = None
        self.trainer_s, self.floor_s = [], []
        self.trainer_peak = self.floor_peak = 0
        self.mark = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        device = args.device
        _sync(device)
        self.trainer_s.append(time.perf_counter() - self.mark)
        if device.type == "cuda":
            self.trainer_peak = max(self.trainer_peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        if self.run_floor:
            if self.floor is None:
                self.floor = self.make_floor()
            start = time.perf_counter()
            self.floor.step()
            _sync(device)
            self.floor_s.append(time.perf_counter() - start)
            if device.type == "cuda":
                self.floor_peak = max(self.floor_peak, torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
        floor = f", floor {self.floor_s[-1]:.3f} s" if self.run_floor else ""
        print(f"step {state.global_step}/{state.max_steps}: trainer {self.trainer_s[-1]:.3f} s{floor}", file=sys.stderr)
        self.mark = time.perf_counter()


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(opts) -> dict:
    cuda = torch.cuda.is_available() and not opts.cpu
    available = {f.name for f in fields(DiffusionDPOConfig)}
    if opts.caching and not all(name in available for name in CACHING_FIELDS):
        sys.exit(f"--caching needs DiffusionDPOConfig fields {CACHING_FIELDS}, which this version does not have.")
    with tempfile.TemporaryDirectory() as workdir:
        dtype = torch.bfloat16 if (opts.bf16 and not opts.full) else torch.float32
        pipeline = build_pipeline(opts.model, workdir, dtype)
        resolution = opts.resolution
        data = make_preference_dataset(n=max(8, 4 * opts.batch), size=resolution)
        total_steps = 1 + opts.warmup + opts.steps  # the first interval also holds the trainer's start-up
        args = DiffusionDPOConfig(
            output_dir=os.path.join(workdir, "out"), resolution=resolution, per_device_train_batch_size=opts.batch,
            max_steps=total_steps, learning_rate=1e-5, beta=5000, report_to="none", save_strategy="no",
            logging_steps=10, disable_tqdm=True, dataloader_pin_memory=cuda, use_cpu=not cuda, seed=0,
            bf16=opts.bf16, activation_checkpointing=opts.gradient_checkpointing, torch_compile=opts.torch_compile,
            optim="adamw_bnb_8bit" if opts.adamw_8bit else "adamw_torch", max_grad_norm=opts.max_grad_norm,
            **({name: True for name in CACHING_FIELDS} if opts.caching else {}),
        )
        peft_config = None if opts.full else LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_rank,
                                                        init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        holder = {}
        callback = Interleave(lambda: Floor(holder["trainer"], holder["batch"], opts.caching), not opts.no_floor)
        trainer = DiffusionDPOTrainer(model=pipeline, args=args, train_dataset=data, peft_config=peft_config,
                                      callbacks=[callback])
        holder["trainer"] = trainer
        # The floor's fixed batch comes from the same rows through the trainer's own collator, uncached.
        rows = [data[i] for i in range(opts.batch)]
        holder["batch"] = PreferenceCollator(resolution)(rows)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()

    skip = 1 + opts.warmup
    trainer_s = statistics.median(callback.trainer_s[skip:])
    result = {
        "config": {k: v for k, v in vars(opts).items() if k not in ("json", "markdown")},
        "machine": machine(),
        "device": "cuda" if cuda else "cpu",
        "measured_steps": len(callback.trainer_s[skip:]),
        "trainer_step_s": trainer_s,
        "trainer_pairs_per_s": opts.batch / trainer_s,
        "trainer_step_s_all": callback.trainer_s,
    }
    if callback.floor_s:
        # Floor step i runs right after trainer step i: skip the same steps, and also report the median of the
        # per-step ratios, which cancels load that changes slowly over the run.
        floor_s = statistics.median(callback.floor_s[skip:])
        paired = [t / f for t, f in zip(callback.trainer_s[skip:], callback.floor_s[skip:])]
        # On a shared machine the fastest step estimates the uncontended cost: report that ratio too.
        result.update(floor_step_s=floor_s, floor_pairs_per_s=opts.batch / floor_s, ratio=trainer_s / floor_s,
                      paired_ratio_median=statistics.median(paired),
                      min_ratio=min(callback.trainer_s[skip:]) / min(callback.floor_s[skip:]),
                      floor_step_s_all=callback.floor_s)
    if cuda:
        result.update(trainer_peak_gib=callback.trainer_peak / 2**30, floor_peak_gib=callback.floor_peak / 2**30)
    else:  # one process: the peak covers trainer and floor (they share the model; the floor adds no weights)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def options(label: dict) -> str:
    flags = [("LoRA" if not label["full"] else "full")]
    flags += [name for name, on in (("cached", label["caching"]), ("grad-ckpt", label["gradient_checkpointing"]),
                                    ("8-bit AdamW", label["adamw_8bit"]), ("bf16", label["bf16"]),
                                    ("compile", label["torch_compile"])) if on]
    return ", ".join(flags)


def markdown(result: dict) -> str:
    c = result["config"]
    memory = (f"{result['trainer_peak_gib']:.2f} GiB (floor {result['floor_peak_gib']:.2f})" if "trainer_peak_gib"
              in result else f"{result['peak_rss_gib']:.2f} GiB RSS")
    floor = (f"{result['floor_step_s']:.3f} | {result['ratio']:.3f} | {result['paired_ratio_median']:.3f} | "
             f"{result['min_ratio']:.3f}" if "ratio" in result else "- | - | - | -")
    return (f"| {c['model']} | {c['resolution']} | {c['batch']} | {options(c)} | {result['device']} | "
            f"{result['trainer_step_s']:.3f} | {result['trainer_pairs_per_s']:.3f} | {floor} | {memory} |\n")


TABLE_HEADER = ("| model | px | pairs/step | options | device | trainer s/step | pairs/s | floor s/step | ratio | "
                "paired ratio | min ratio | peak memory |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd15", "sdxl", "tiny"), default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="preference pairs per step (2x images)")
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--caching", action="store_true", help="precomputed latents and text embeddings")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--adamw-8bit", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--torch-compile", action="store_true", help="TrainingArguments.torch_compile")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="the Trainer default; the floor clips too")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="measured steps (median)")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--markdown", help="append the table row here")
    opts = parser.parse_args(argv)
    result = run(opts)
    table = markdown(result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}, indent=2))
    print(TABLE_HEADER + table)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    if opts.markdown:
        new = not os.path.exists(opts.markdown) or os.path.getsize(opts.markdown) == 0
        with open(opts.markdown, "a") as f:
            f.write((TABLE_HEADER if new else "") + table)


if __name__ == "__main__":
    main()
