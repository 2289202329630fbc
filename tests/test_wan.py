"""Wan text-to-video on a tiny offline WanPipeline: the family's conformance (first loss ln 2, shared inputs, noising,
latent normalisation, saving, caching), a separable video preference, KTO on videos, and the Wan 2.2 A14B refusal."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LN2, forbid, make_args
from datasets import Dataset, Features, Value
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict

from diffusion_dpo_trainer import DiffusionDPOTrainer
from diffusion_dpo_trainer.families import WanFamily, load_family
from diffusion_dpo_trainer.testing_wan import FLOW_SHIFT, colour_ramp, make_video_preference_dataset
from diffusion_dpo_trainer.video_data import encode_video

FRAMES = 5  # 2 latent frames of 4x4 latents at 32 px: the cheapest clip that still has time in it


@pytest.fixture(scope="module")
def videos():
    return make_video_preference_dataset(n=4, num_frames=FRAMES)


def wan_args(tmp_path, **overrides):
    return make_args(tmp_path, **{"num_frames": FRAMES, **overrides})


def family_lora(**overrides):
    # No target_modules: the family's documented defaults (attention and feed-forward) apply.
    return LoraConfig(**{"r": 4, "lora_alpha": 4, "init_lora_weights": "gaussian", **overrides})


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def render(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red square", num_inference_steps=2, height=32, width=32, num_frames=FRAMES, output_type="np",
                generator=generator, max_sequence_length=16).frames


def test_lora_first_loss_is_ln2_and_the_adapter_loads_into_wanpipeline(tmp_path, wan_path, videos):
    args = wan_args(tmp_path, max_steps=3, learning_rate=1e-2)
    trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=videos, peft_config=family_lora())
    assert isinstance(trainer.family, WanFamily) and trainer.beta == WanFamily.default_beta
    trainer.train()
    # The adapter starts as a no-op and the reference is the adapter switched off.
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)
    assert all(math.isfinite(x) for x in losses_of(trainer))
    trainer.save_model()

    trained = get_peft_model_state_dict(trainer.family.denoiser)
    # Default targets: self-attention, cross-attention and feed-forward of the blocks.
    for part in (".attn1.to_q.", ".attn2.to_k.", ".ffn.net.0.proj.", ".ffn.net.2."):
        assert any(part in k for k in trained), part
    fresh = WanPipeline.from_pretrained(wan_path)
    without = render(fresh)
    fresh.load_lora_weights(args.output_dir, adapter_name="dpo")
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name="dpo")
    assert loaded.keys() == trained.keys()  # every trained layer loads, none is dropped
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value)
    with_lora = render(fresh)
    assert with_lora.shape == (1, FRAMES, 32, 32, 3)
    assert not np.allclose(without, with_lora), "the loaded LoRA does not change the generated frames"
    card = Path(args.output_dir, "README.md").read_text(encoding="utf-8")
    assert "pipeline_tag: text-to-video" in card and "WanPipeline.from_pretrained" in card and ".frames[0]" in card
    assert f"`num_frames`: {FRAMES}" in card and "beta = 500" in card


def test_policy_and_reference_see_identical_inputs_with_noise_and_timestep_shared_per_pair(tmp_path, wan_path, videos):
    args = wan_args(tmp_path)
    trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=videos, peft_config=family_lora())
    family, calls, draws = trainer.family, [], []
    handle = family.denoiser.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v.detach().clone() for k, v in kw.items() if torch.is_tensor(v)}),
        with_kwargs=True)
    original = family.noisy_latents_and_target

    def spy(x0, noise, timesteps):
        draws.append((noise.clone(), timesteps.clone()))
        return original(x0, noise, timesteps)

    family.noisy_latents_and_target = spy
    try:
        trainer.train()
    finally:
        handle.remove()

    n = args.per_device_train_batch_size
    assert len(calls) == 2 * args.max_steps  # one policy and one reference forward per step
    for step in range(args.max_steps):
        policy, reference = calls[2 * step], calls[2 * step + 1]
        assert policy.keys() == reference.keys() == {"hidden_states", "timestep", "encoder_hidden_states"}
        for key in policy:
            assert torch.equal(policy[key], reference[key]), key
        # (winners + losers, 16 channels, 2 latent frames for 5 frames, 32 px / 8)
        assert policy["hidden_states"].shape == (2 * n, 16, 2, 4, 4)
        noise, timesteps = draws[step]
        assert torch.equal(noise[:n], noise[n:]) and torch.equal(timesteps[:n], timesteps[n:])


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


def test_full_finetune_saves_a_transformer_that_wanpipeline_loads(tmp_path, wan_path, videos):
    args = wan_args(tmp_path, max_steps=2)
    trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=videos)
    before = {k: v.clone() for k, v in trainer.family.denoiser.state_dict().items()}
    trainer.train()
    assert losses_of(trainer)[0] == pytest.approx(LN2, abs=1e-6)  # policy == frozen copy at step 1
    trainer.save_model()
    reloaded = WanTransformer3DModel.from_pretrained(args.output_dir, subfolder="transformer")
    trained = trainer.family.denoiser.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the transformer did not train"
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trained[key])
    assert np.isfinite(render(WanPipeline.from_pretrained(wan_path, transformer=reloaded))).all()


def test_cached_and_uncached_video_runs_give_the_same_losses(tmp_path, wan_path, videos):
    """The recipe's settings (cached latents and prompts, gradient checkpointing, flips) change nothing but speed."""
    runs = {}
    for cached in (False, True):
        args = wan_args(tmp_path / str(cached), max_steps=3, random_flip=True, gradient_checkpointing=True,
                        precompute_latents=cached, precompute_text_embeddings=cached)
        trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=videos)
        if cached:
            assert trainer.train_dataset[0]["chosen_latent_mean"].shape == (16, 2, 4, 4)
            forbid(trainer.family.vae, "the VAE")
            forbid(trainer.family.text_encoders[0], "the text encoder")
        assert trainer.family.denoiser.is_gradient_checkpointing
        trainer.train()
        runs[cached] = losses_of(trainer)
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert len(set(np.round(runs[False], 4))) > 1  # the model did train


def test_time_direction_preference_drives_rewards_accuracies_up(tmp_path, wan_path):
    """Brightening clips preferred over the same clips played backwards: only the order of frames separates them."""
    data = make_video_preference_dataset(n=8, num_frames=FRAMES)
    args = wan_args(tmp_path, max_steps=30, learning_rate=1e-2, per_device_train_batch_size=4,
                    precompute_latents=True, precompute_text_embeddings=True)
    trainer = DiffusionDPOTrainer(model=wan_path, args=args, train_dataset=data, peft_config=family_lora())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    early = np.mean([h["rewards/accuracies"] for h in logs[:3]])
    late = np.mean([h["rewards/accuracies"] for h in logs[-10:]])
    assert late >= 0.9 and late > early + 0.3, (early, late)
    assert np.mean([h["rewards/margins"] for h in logs[-10:]]) > 0
    assert np.mean([h["loss"] for h in logs[-10:]]) < LN2


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


def test_resolution_must_fit_the_vae_and_the_patches(tmp_path, wan_path, videos):
    with pytest.raises(ValueError, match=r"resolution=40 must be a multiple of 16 for WanPipeline"):
        DiffusionDPOTrainer(model=wan_path, args=wan_args(tmp_path, resolution=40), train_dataset=videos)


def test_wan22_two_expert_checkpoints_are_refused_before_any_weight_loads(tmp_path, wan_path):
    # Only model_index.json: loading any weights would fail differently.
    folder = tmp_path / "a14b"
    folder.mkdir()
    index = json.loads(Path(wan_path, "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"Wan 2\.2 A14B .*transformer_2.*\(Wan-AI/Wan2\.1-T2V-1\.3B-Diffusers"):
        load_family(folder)
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
