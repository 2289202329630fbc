"""The digits demo's flow-matching base model (--base flow): a tiny Stable Diffusion 3 pipeline pretrained with
rectified flow on the same half of the data, with the same VAE recipe, as the epsilon base of digits_common.py.

Why SD3: the library trains it through `FlowMatchingFamily`, its MMDiT is the architecture Flow-GRPO and DiffusionNFT
report on (SD3.5-Medium), and its encoders shrink to toys: two 2-layer CLIPs and a 1-layer T5.
Pretraining noises and predicts through the library's own SD3 family (`sample_timesteps`,
`noisy_latents_and_target`, `predict`), so the base learns exactly the objective that DPO, GRPO and NFT train on:
x_t = (1 - s) x0 + s eps, target eps - x0, s from SD3's logit-normal timestep sampling.
"""

import tempfile

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from digits_common import PROMPTS, SIZE, make_text_encoder, train_vae
from transformers import T5Config, T5EncoderModel

from diffusion_dpo_trainer.families import family_class_for
from diffusion_dpo_trainer.testing import write_t5_tokenizer

# The velocity of a flow model: the pipeline's own Euler sampler on SD3's schedule. The static shift is 1, not SD3's
# 3: the shift moves noise levels up for large images (SD3 paper, section 5.3.2), and these are 16 px.
SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0}
LEARNING_RATE = 1e-3  # AdamW, one-cycle: the epsilon base's UNet recipe


def make_transformer(seed: int, context_dim: int, pooled_dim: int) -> SD3Transformer2DModel:
    """An MMDiT on 2x2 patches of the 4x8x8 latents (16 image tokens), two joint blocks 64 wide.

    The pipeline appends T5's 256 tokens (its default `max_sequence_length`, padding included) to the 8 CLIP tokens
    of each prompt: the text stream, not the 16 image tokens, is most of the cost, so the model stays shallow."""
    torch.manual_seed(seed)
    heads, head_dim = 2, 32
    return SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=SIZE // 4,
    )


def train_transformer(pipe, pixels, labels, steps, batch_size, seed, log, on_step=None):
    """Rectified-flow pretraining of `pipe.transformer` with the text encoders learning beside it (as the epsilon
    base's encoder does), conditioned through the pipeline's own `encode_prompt`, as sampling conditions it."""
    family = family_class_for("StableDiffusion3Pipeline")(pipe)
    vae, transformer = pipe.vae, pipe.transformer
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        mean, std = posterior.mean, posterior.std
    # T5 learns too: its 256 tokens (no attention mask) outnumber the 8 CLIP tokens in the joint attention, and a
    # frozen random T5 left them as noise that the digit had to be heard through (the base ignored the prompt).
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = [*transformer.parameters()]
    for encoder in encoders:
        encoder.train().requires_grad_(True)
        params += encoder.parameters()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=max(steps, 1),
                                                   pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(pixels), (batch_size,), generator=generator)
        x0 = family.scale_latents(mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        t = family.sample_timesteps(batch_size, "cpu", generator)
        noisy, target = family.noisy_latents_and_target(x0, noise, t)
        # The 10 prompts once, then one row per sample.
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                  do_classifier_free_guidance=False)
        conditioning = {"encoder_hidden_states": embeds[labels[idx]], "pooled_projections": pooled[labels[idx]]}
        loss = F.mse_loss(family.predict(transformer, noisy, t, conditioning), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        log("transformer", step, steps, loss.item())
        if on_step is not None:
            on_step(step, transformer, encoders)
    for encoder in encoders:
        encoder.eval().requires_grad_(False)
    transformer.eval().requires_grad_(False)
    return losses


def make_t5(seed: int, width: int):
    """T5 must be there: a saved SD3 pipeline without it does not load by path. A 1-layer encoder as wide as the
    transformer's joint attention."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_t5_tokenizer(scratch)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=2 * width, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return tokenizer, T5EncoderModel(config).eval().requires_grad_(False)


def build_flow_pipeline(path, pixels, labels, settings, seed: int, log, on_step=None) -> dict:
    """The flow base, saved as an ordinary `StableDiffusion3Pipeline`; `settings.unet_steps` are its steps."""
    pixels3 = (pixels * 2 - 1)[:, None].repeat(1, 3, 1, 1)
    tokenizer, text_encoder = make_text_encoder(seed, projection_dim=32)
    _, text_encoder_2 = make_text_encoder(seed + 1, projection_dim=32)
    vae, vae_losses = train_vae(pixels3, settings.vae_steps, settings.batch_size, seed, log)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline adds the shift back when decoding
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size  # the CLIP states, side by side
    tokenizer_3, text_encoder_3 = make_t5(seed + 2, width)
    pipe = StableDiffusion3Pipeline(
        transformer=make_transformer(seed, context_dim=width, pooled_dim=2 * text_encoder.config.projection_dim),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    losses = train_transformer(pipe, pixels3, torch.as_tensor(labels), settings.unet_steps, settings.batch_size,
                               seed, log, on_step)
    pipe.save_pretrained(path, safe_serialization=True)
    return {"vae": vae_losses, "transformer": losses}
