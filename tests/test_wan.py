"""Wan text-to-video facts on a tiny offline WanPipeline (the family conformance suite covers ln 2, shared inputs,
LoRA loading, full fine-tunes and caching): flow_shift noising, per-channel latent normalisation, the Wan 2.2 TI2V
layout, a separable video preference, KTO on videos, the frame-count rule and the Wan 2.2 A14B refusal."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from helpers import LN2, lora, losses_of, make_args

from diffusion_dpo_trainer import DiffusionDPOTrainer, cli
from diffusion_dpo_trainer.families import load_family
from diffusion_dpo_trainer.families.wan import WanFamily
from diffusion_dpo_trainer.testing.wan import (
    FLOW_SHIFT,
    TINY_NUM_FRAMES,
    colour_ramp,
    make_video_preference_dataset,
)
from diffusion_dpo_trainer.video_data import encode_video

FRAMES = TINY_NUM_FRAMES  # 2 latent frames of 4x4 latents at 32 px


@pytest.fixture(scope="module")
def videos():
    return make_video_preference_dataset(n=4, num_frames=FRAMES)


def wan_args(tmp_path, **overrides):
    return make_args(tmp_path, **{"num_frames": FRAMES, **overrides})


def family_lora():
    return lora(target_modules=None)  # the family's documented defaults: attention and feed-forward


def test_noising_uses_the_schedulers_flow_shift(tmp_path, wan_path):
    family = load_family(wan_path, args=wan_args(tmp_path))
    torch.manual_seed(0)
    timesteps = family.sample_timesteps(8, torch.device("cpu"))
    x0, noise = torch.randn(8, 16, 2, 4, 4), torch.randn(8, 16, 2, 4, 4)
    noisy, target = family.noisy_latents_and_target(x0, noise, timesteps)
    s = (timesteps / 1000).view(-1, 1, 1, 1, 1)  # the transformer sees t = 1000 s
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(target, noise - x0)
    # s is the shifted grid s = k b / (1 + (k - 1) b), b = j/1000, with k the UniPC config's flow_shift.
    grid = s.flatten() / (FLOW_SHIFT - (FLOW_SHIFT - 1) * s.flatten())
    torch.testing.assert_close(grid * 1000, (grid * 1000).round(), atol=2e-3, rtol=0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    torch.testing.assert_close(noisy, scheduler.scale_noise(x0, timesteps, noise))


def test_latents_are_normalised_per_channel_as_the_pipeline_denormalises_them(wan_path):
    family = load_family(wan_path)
    config = family.vae.config
    z = torch.randn(2, 16, 2, 4, 4)
    scaled = family.scale_latents(z)
    for channel in range(16):
        expected = (z[:, channel] - config.latents_mean[channel]) / config.latents_std[channel]
        torch.testing.assert_close(scaled[:, channel], expected)
    # WanPipeline decodes `latents / (1 / std) + mean`: the exact inverse.
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(scaled / inverse_std + mean, z)
    assert family.latent_shape((3, 9, 32, 48)) == (16, 3, 4, 6)


def test_time_direction_preference_drives_rewards_accuracies_up(tmp_path, wan_path):
    """Brightening clips preferred over the same clips played backwards: only the order of frames separates them.
    With the recipe's settings: cached latents and prompts, gradient checkpointing."""
    data = make_video_preference_dataset(n=8, num_frames=FRAMES)
    args = wan_args(tmp_path, max_steps=30, learning_rate=1e-2, per_device_train_batch_size=4,
                    precompute_latents=True, precompute_text_embeddings=True, gradient_checkpointing=True)
    trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=data, peft_config=family_lora())
    assert trainer.family.denoiser.is_gradient_checkpointing
    assert trainer.train_dataset[0]["chosen_latent_mean"].shape == (16, 2, 4, 4)  # (C, latent frames, H/8, W/8)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    early = np.mean([h["rewards/accuracies"] for h in logs[:3]])
    late = np.mean([h["rewards/accuracies"] for h in logs[-10:]])
    assert late >= 0.9 and late > early + 0.3, (early, late)
    assert np.mean([h["rewards/margins"] for h in logs[-10:]]) > 0
    assert np.mean([h["loss"] for h in logs[-10:]]) < LN2
    trainer.save_model()
    card = Path(args.output_dir, "README.md").read_text(encoding="utf-8")
    assert "pipeline_tag: text-to-video" in card and "WanPipeline.from_pretrained" in card and ".frames[0]" in card
    assert f"`num_frames`: {FRAMES}" in card and f"beta = {WanFamily.default_beta:g}" in card


def test_kto_trains_on_unpaired_labelled_videos_cached_or_not(tmp_path, wan_path):
    ramps = [colour_ramp(FRAMES, colour) for colour in ((200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60))]
    data = Dataset.from_dict(
        {"prompt": ["a square"] * 4, "video": [encode_video(r if i % 2 else r[::-1]) for i, r in enumerate(ramps)],
         "label": [False, True, False, True]},
        features=Features({"prompt": Value("string"), "video": Value("binary"), "label": Value("bool")}))
    runs = {}
    for cached in (False, True):
        args = wan_args(tmp_path / str(cached), loss_type="kto", per_device_train_batch_size=4,
                        precompute_latents=cached)
        trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=data, peft_config=family_lora())
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        key = "latent_mean" if cached else "pixel_values"
        assert batch[key].shape == ((4, 16, 2, 4, 4) if cached else (4, 3, FRAMES, 32, 32))
        trainer.train()
        runs[cached] = losses_of(trainer)
        assert all(math.isfinite(x) for x in runs[cached])
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


def test_kto_names_the_missing_video_column(tmp_path, wan_path):
    data = Dataset.from_dict({"prompt": ["a"], "image": [b""], "label": [True]})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['video'\].*'prompt', 'video', 'label'"):
        DiffusionDPOTrainer(model=wan_path, args=wan_args(tmp_path, loss_type="kto"), train_dataset=data)


@pytest.mark.parametrize("num_frames, nearest", [(8, "5 or 9"), (10, "9 or 13"), (0, "1")])
def test_num_frames_must_fit_the_temporal_compression(tmp_path, wan_path, videos, num_frames, nearest):
    with pytest.raises(ValueError, match=rf"num_frames={num_frames} .* Nearest valid counts: {nearest}\."):
        DiffusionDPOTrainer(model=wan_path, args=wan_args(tmp_path, num_frames=num_frames), train_dataset=videos)


def test_wan22_two_expert_checkpoints_are_refused_before_any_weight_loads(tmp_path, wan_path, capsys):
    # Only model_index.json: loading any weights would fail differently.
    folder = tmp_path / "a14b"
    folder.mkdir()
    index = json.loads(Path(wan_path, "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"Wan 2\.2 A14B .*transformer_2.*\(Wan-AI/Wan2\.1-T2V-1\.3B-Diffusers"):
        load_family(folder)
    # The command line refuses it in one line (exit 2) before it reads the (here missing) dataset.
    assert cli.main(["train", "--model_name_or_path", str(folder), "--dataset_name", str(tmp_path / "none"),
                     "--output_dir", str(tmp_path / "out")]) == 2
    assert "Wan 2.2 A14B checkpoints" in capsys.readouterr().err
    # A pipeline object with a second expert is refused the same way.
    pipe = WanPipeline.from_pretrained(wan_path)
    two_experts = WanPipeline(**{**pipe.components, "transformer_2": pipe.transformer}, boundary_ratio=0.875)
    with pytest.raises(ValueError, match=r"Wan 2\.2 A14B"):
        load_family(two_experts)


def test_wan22_ti2v_layout_48_channel_16x_vae_and_per_token_timesteps(wan_path):
    """Wan 2.2 TI2V-5B as text-to-video: a patchifying 16x VAE with 48 channels, and `expand_timesteps` (one timestep
    per token at inference), which for text-to-video equals the single per-sample timestep the family passes."""
    from diffusers import AutoencoderKLWan

    base = WanPipeline.from_pretrained(wan_path)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
                           temperal_downsample=[False, True, True], in_channels=12, out_channels=12, patch_size=2,
                           scale_factor_spatial=16, latents_mean=[0.1] * 48, latents_std=[2.0] * 48)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=48, out_channels=48, text_dim=32, ffn_dim=32, num_layers=2,
                                        rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae, scheduler=base.scheduler,
                       transformer=transformer, expand_timesteps=True)
    family = load_family(pipe)
    assert (family.vae_scale_factor, family.resolution_multiple()) == (16, 32)
    mean, _ = family.encode_pixels(torch.rand(2, 3, FRAMES, 64, 64) * 2 - 1)
    assert mean.shape == (2, *family.latent_shape((3, FRAMES, 64, 64))) == (2, 48, 2, 4, 4)
    latents = family.scale_latents(mean)
    torch.testing.assert_close(latents, (mean - 0.1) / 2.0)
    conditioning = family.encode_prompt(["a", "b"], torch.device("cpu"))
    timesteps = family.sample_timesteps(2, torch.device("cpu"))
    with torch.no_grad():
        prediction = family.predict(transformer, latents, timesteps, conditioning)
        tokens = 2 * 2 * 2  # latent frames x (4 / 2) x (4 / 2) patches
        per_token = transformer(hidden_states=latents, timestep=timesteps[:, None].expand(2, tokens),
                                encoder_hidden_states=conditioning["encoder_hidden_states"], return_dict=False)[0]
    torch.testing.assert_close(prediction, per_token, atol=1e-5, rtol=1e-5)
