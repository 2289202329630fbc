"""Long runs are safe: exact resume (policy, reference, noise stream), non-finite losses stop cleanly, bad checkpoints
are named."""

import os
import re
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import count_sampled, lora, losses_of, make_args
from safetensors import SafetensorError
from transformers import TrainerCallback

from diffusion_dpo_trainer import DiffusionDPOTrainer


def test_full_finetune_resume_is_exact_and_keeps_the_initial_reference(tmp_path, sd_path, pairs):
    def run(name, **overrides):
        args = make_args(tmp_path / name, max_steps=4, learning_rate=1e-3, **overrides)
        return DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs)

    straight = run("straight")
    straight.train()
    first = run("first", save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-2")
    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=checkpoint)

    expected = straight.family.pipeline.unet.state_dict()
    for key, value in resumed.family.pipeline.unet.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # The same noise, timesteps and latent samples after the resume: the losses of steps 3 and 4 agree (the first two
    # entries come from the checkpoint's saved log history).
    assert len(losses_of(resumed)) == 4
    assert losses_of(resumed) == pytest.approx(losses_of(straight), abs=1e-5)

    # The reference is the initial UNet, not the policy of the checkpoint it resumed from.
    initial = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet").state_dict()
    at_checkpoint = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").state_dict()
    reference = resumed.ref_model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in initial.items())
    assert any(not torch.equal(reference[k], v) for k, v in at_checkpoint.items())


class PoisonAdapterBeforeStep(TrainerCallback):
    """Turns one LoRA weight into NaN just before optimizer step `step`, as a diverged update would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            weight = next(p for n, p in model.named_parameters() if "lora_B" in n)
            with torch.no_grad():
                weight.fill_(float("nan"))


def test_non_finite_loss_stops_at_its_step_and_keeps_checkpoints_finite(tmp_path, sd_path, pairs):
    args = make_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=1, learning_rate=1e-4)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora(),
                                  callbacks=[PoisonAdapterBeforeStep(3)])
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert "at step 3" in message
    # The policy error is NaN, the (adapter-disabled) reference error is finite: both are named, with remedies.
    assert "mse/chosen=nan" in message and "mse/rejected=nan" in message
    ref_chosen = float(message.split("ref_mse/chosen=")[1].split(",")[0])
    assert 0 < ref_chosen < 10
    for advice in ("learning_rate", "beta", "bf16", "sdxl-vae-fp16-fix"):
        assert advice in message
    assert sorted(os.listdir(args.output_dir)) == ["checkpoint-1", "checkpoint-2"]


def test_save_refuses_non_finite_weights_and_keeps_the_previous_model(tmp_path, sd_path, pairs):
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, max_steps=3, learning_rate=1e-4), train_dataset=pairs, peft_config=lora())
    trainer.save_model()
    saved = os.path.join(trainer.args.output_dir, "pytorch_lora_weights.safetensors")
    before = open(saved, "rb").read()
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"Not saving to .*NaN/inf.*lora_A"):
        trainer.save_model()
    assert open(saved, "rb").read() == before


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.mark.parametrize(
    "case, use_lora, match",
    [
        ("missing", True, r"checkpoint directory .* does not exist"),
        ("truncated", True, r"pytorch_lora_weights.safetensors is not a readable safetensors file"),
        ("truncated", False, r"diffusion_pytorch_model.safetensors is not a readable safetensors file"),
        ("pickle", False, r"no readable safetensors weights"),
    ],
)
def test_bad_checkpoint_gets_a_clear_error(tmp_path, sd_path, pairs, case, use_lora, match):
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, max_steps=3, learning_rate=1e-4), train_dataset=pairs,
                                  peft_config=lora() if use_lora else None)
    checkpoint = tmp_path / "checkpoint-1"
    if case == "truncated":
        trainer.save_model(str(checkpoint))
        name = "pytorch_lora_weights.safetensors" if use_lora else "unet/diffusion_pytorch_model.safetensors"
        _truncate(checkpoint / name)
    elif case == "pickle":  # a pickled checkpoint is never unpickled
        trainer.model.save_pretrained(checkpoint / "unet", safe_serialization=False)
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ----- evaluate resumes what the weights made, not what a path named ------------------------------------------------
def _save_random_lora(sd_path, path, seed):
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(sd_path)
    pipe.unet.add_adapter(lora())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    pipe.save_lora_weights(path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))


def test_evaluate_resumes_on_the_adapters_content_not_its_path(tmp_path, sd_path, monkeypatch):
    import numpy as np

    from diffusion_dpo_trainer import protocol

    def brightness(images, prompts):
        return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]

    sampled = count_sampled(monkeypatch, protocol)
    kwargs = dict(num_inference_steps=2, resolution=32, batch_size=2, progress=False)
    sets = {"p": ["a red square", "a blue circle"]}
    adapter = tmp_path / "adapter"
    _save_random_lora(sd_path, adapter, seed=0)
    old = protocol.evaluate_protocol(sd_path, sets, [brightness], tmp_path / "eval", lora=str(adapter), **kwargs)
    _save_random_lora(sd_path, adapter, seed=1)  # retrained into the same folder
    sampled.clear()
    rerun = protocol.evaluate_protocol(sd_path, sets, [brightness], tmp_path / "eval", lora=str(adapter), **kwargs)
    assert len(sampled) == 2  # the tuned images only: the base did not change
    fresh = protocol.evaluate_protocol(sd_path, sets, [brightness], tmp_path / "fresh", lora=str(adapter), **kwargs)
    tuned = [r["p"]["brightness"]["tuned"]["mean"] for r in (old["results"], rerun["results"], fresh["results"])]
    assert tuned[1] == pytest.approx(tuned[2]) and tuned[1] != pytest.approx(tuned[0])
    assert rerun["results"]["p"]["brightness"]["base"] == fresh["results"]["p"]["brightness"]["base"]


# ----- resuming from a checkpoint that is not this run's, or not whole ----------------------------------------------
@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, sd_path, pairs):
    """A real one-step LoRA checkpoint (r=4 on the attention projections), with the Trainer's own files."""
    out = tmp_path_factory.mktemp("lora-run")
    args = make_args(out, max_steps=1, learning_rate=1e-4, save_strategy="steps", save_steps=1)
    DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora()).train()
    return os.path.join(args.output_dir, "checkpoint-1")


@pytest.mark.parametrize("config, match", [
    ({"r": 8, "lora_alpha": 8}, r"tensors of another shape .*lora_A\.weight \(4, 32\) vs \(8, 32\)"),
    ({"target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]}, r"LoRA tensors missing from it .*proj_in"),
    ({"target_modules": ["to_q", "to_k"]}, r"unexpected LoRA tensors .*to_(v|out)"),
])
def test_resuming_another_adapter_is_refused_in_one_line(tmp_path, sd_path, pairs, lora_checkpoint, config, match):
    """PEFT loads a partial match silently: another rank raised a long traceback, and extra targets resumed with the
    missing tensors freshly initialised (another run, exit 0)."""
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, max_steps=2), train_dataset=pairs,
                                  peft_config=lora(**config))
    with pytest.raises(ValueError, match=match) as info:
        trainer.train(resume_from_checkpoint=lora_checkpoint)
    assert "pytorch_lora_weights.safetensors holds another adapter" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, match", [
    ("trainer_state.json", "is missing or unreadable: not valid JSON"),
    ("optimizer.pt", "is missing or unreadable: not a torch.save archive"),
    ("rng_state.pth", "is missing or unreadable: not a torch.save archive"),
])
def test_truncated_trainer_file_of_a_checkpoint_is_named(tmp_path, sd_path, pairs, lora_checkpoint, name, match):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(lora_checkpoint, checkpoint)
    _truncate(checkpoint / name)
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, max_steps=2), train_dataset=pairs,
                                  peft_config=lora())
    with pytest.raises(ValueError, match=f"{re.escape(str(checkpoint / name))} {match}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def _no_space(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_save_fails(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save, disk full


@pytest.mark.parametrize("writer", ["adapter", "optimizer"])
def test_a_full_disk_while_saving_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, sd_path, pairs,
                                                                                     monkeypatch, writer):
    args = make_args(tmp_path, max_steps=3, learning_rate=1e-4, save_strategy="steps", save_steps=1,
                     save_total_limit=1)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora())

    class FillDiskAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                if writer == "adapter":
                    monkeypatch.setattr(trainer.family, "save_lora_weights", _no_space)
                else:
                    monkeypatch.setattr(torch, "save", _torch_save_fails)

    trainer.add_callback(FillDiskAtStep2())
    with pytest.raises(OSError, match=r"Could not write the checkpoint .*checkpoint-2 .*No space left|unexpected pos"):
        trainer.train()
    monkeypatch.undo()
    assert sorted(os.listdir(args.output_dir)) == ["checkpoint-1"]  # the partial one removed, the last one kept
    resumed = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path / "again", max_steps=2), train_dataset=pairs,
                                  peft_config=lora())
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-1"))
    assert resumed.state.global_step == 2


def test_an_fsdp_launch_that_accelerate_runs_without_fsdp_says_so(tmp_path, sd_path, pairs, monkeypatch):
    """accelerate enables FSDP only for GPU process groups: on CPU an FSDP launch config silently trained plain DDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.warns(UserWarning, match=r"asks for FSDP, but accelerate enables FSDP only on GPUs .* WITHOUT FSDP"):
        trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path), train_dataset=pairs, peft_config=lora())
    assert not trainer.is_fsdp_enabled


def test_resuming_a_full_fine_tune_of_another_model_is_one_line(tmp_path, sd_path, pairs):
    config = dict(UNet2DConditionModel.load_config(sd_path, subfolder="unet"))
    config["block_out_channels"] = [16, 64]  # another architecture under the same class
    UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "checkpoint-1" / "unet")
    trainer = DiffusionDPOTrainer(model=sd_path, args=make_args(tmp_path, max_steps=2), train_dataset=pairs)
    with pytest.raises(ValueError, match=r"unet holds another model than this run's: .*size mismatch") as info:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "\n" not in str(info.value)
