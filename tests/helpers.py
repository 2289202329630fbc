"""Helpers shared by the test modules (fixtures live in conftest.py): configs, adapters, metrics, rendering, and a
recorder of denoiser calls and noise draws. Test modules import from here, never from each other."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig

from diffusion_dpo_trainer import DiffusionDPOConfig, cli

TESTS = Path(__file__).resolve().parent
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LN2 = math.log(2.0)  # the first DPO loss, while the policy still equals the reference


def make_args(tmp_path, **overrides):
    """A small CPU training config under tmp_path; each test overrides what it exercises."""
    values = {"output_dir": str(tmp_path / "out"), "resolution": 32, "per_device_train_batch_size": 2, "max_steps": 2,
              "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
              "dataloader_pin_memory": False}
    values.update(overrides)
    return DiffusionDPOConfig(**values)


def parse_recipe(name, *flags):
    """An example recipe (`examples/<name>.yaml`) parsed as `diffusion-dpo train --config` parses it, with `flags` on
    the command line: `(ScriptArguments, DiffusionDPOConfig)`. `--use_cpu` lets bf16 recipes validate on a machine
    without a GPU; a bad flag raises SystemExit as the command line exits."""
    return cli.parse_train_args(["--config", str(EXAMPLES / f"{name}.yaml"), "--use_cpu", "true", *flags])


def lora(**overrides):
    return LoraConfig(**{"r": 4, "lora_alpha": 4, "init_lora_weights": "gaussian", "target_modules": LORA_TARGETS,
                         **overrides})


def forbid(module, name):
    """Make `module` raise if it runs: proves a cached step never calls a frozen encoder."""
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called during training")

    module.forward = fail
    if hasattr(module, "encode"):
        module.encode = fail


def forbid_frozen_encoders(family):
    """Make the family's VAE and text encoders raise if they run (a cached run must never call them)."""
    forbid(family.vae, "the VAE")
    for i, encoder in enumerate(family.text_encoders):
        forbid(encoder, f"text encoder {i}")


def assert_cached_run_matches_uncached(make_trainer, image_column: str):
    """Train twice with the same seed, without and with `precompute_latents` + `precompute_text_embeddings`
    (`make_trainer(cached)` builds each trainer): the cached run trains from latents (its `image_column` is gone), moves
    the encoders off the accelerator, never calls them, and logs the same loss at every step; both evaluate."""
    runs = {}
    for cached in (False, True):
        trainer = make_trainer(cached)
        if cached:
            assert image_column not in trainer.train_dataset.column_names  # trained from latents: images unread
            assert all(next(m.parameters()).device.type == "cpu" for m in trainer.family.frozen_modules)
            forbid_frozen_encoders(trainer.family)
        trainer.train()
        runs[cached] = losses_of(trainer)
        assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert len(set(np.round(runs[False], 4))) > 1  # the model did train
    return runs


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: comparisons of runs whose batches are split differently (processes, generation
    batches) are exact only when every matmul reduces in the same order, as with OMP_NUM_THREADS=1 in the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_two_processes(worker: str, *argv, timeout: float = 300, hang: str = "") -> None:
    """tests/<worker> on 2 processes (torch.distributed.run, gloo, one thread each, this checkout first on the path).
    A run that hangs is stopped with SIGTERM, which torch.distributed.run passes on to its ranks (SIGKILL would orphan
    them), and fails the test with `hang` as the reason."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / worker), *map(str, argv)]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.terminate()
        launcher.communicate(timeout=60)
        pytest.fail(f"The 2-process run of {worker} hung{': ' + hang if hang else '.'}")
    assert launcher.returncode == 0, stderr[-3000:]


def on_policy_reports(tmp_path, method: str, pipeline_path: str) -> tuple[list[dict], dict]:
    """onpolicy_ddp_worker.py's `method` on 2 processes and on one with the same global batch: (the two ranks'
    reports, the single process's), each with `logged`, its log entries of the optimizer steps. Checked here: where the
    trainer samples through `_sample`, each rollout's prompts and seeds are split between the ranks exactly as one
    process draws them (2 rollouts in 3 steps: new samples at steps 0 and 2, reused at step 1)."""
    import onpolicy_ddp_worker as worker

    run_two_processes("onpolicy_ddp_worker.py", method, pipeline_path, tmp_path / "ddp", tmp_path)
    with one_thread():  # as the workers (OMP_NUM_THREADS=1): the same reduction order in every matmul
        worker.run(method, pipeline_path, str(tmp_path / "single"), str(tmp_path), single=True)
    ranks = [json.loads((tmp_path / f"{method}-rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / f"{method}-rank0-single.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    if single["sampled"]:
        assert len(single["sampled"]) == len(ranks[0]["sampled"]) == 2
        for generation, expected in enumerate(single["sampled"]):
            for field in ("prompts", "seeds"):
                assert ranks[0]["sampled"][generation][field] + ranks[1]["sampled"][generation][field] \
                    == expected[field]
    for report in (*ranks, single):
        report["logged"] = [h for h in report["log_history"] if "loss" in h]
        assert len(report["logged"]) == 3
    return ranks, single


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def render(pipe, prompt="a solid red square", size=32, **call_kwargs):
    """A fixed-seed 2-step sample as a numpy array (images, or a video pipeline's frames)."""
    generator = torch.Generator().manual_seed(0)
    output = pipe(prompt=prompt, num_inference_steps=2, height=size, width=size, output_type="np", generator=generator,
                  **call_kwargs)
    return output.images if hasattr(output, "images") else output.frames


class DenoiserRecorder:
    """Records every denoiser call's tensor inputs, and every draw of noise and timesteps, during `trainer.train()`.

    Use as a context manager around training; `calls` holds one dict of tensors (positional args as `arg0`, ...,
    items of a list or dict argument as `arg0.0` or `name.key`) per forward, `draws` one `(noise, timesteps, family_extra)` per step, where `family_extra` is the flow families'
    sigmas (None for the others).
    """

    def __init__(self, trainer):
        self.family = trainer.family
        self.calls, self.draws = [], []

    def _record(self, module, args, kwargs):
        tensors = {}
        for key, value in [*((f"arg{i}", a) for i, a in enumerate(args)), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, dict):  # SDXL's added conditioning is a dict of tensors
                tensors.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
            elif isinstance(value, (list, tuple)):  # Z-Image takes a list of latents and one of captions
                tensors.update({f"{key}.{i}": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
        self.calls.append({k: v.detach().clone() for k, v in tensors.items()})

    def __enter__(self):
        family = self.family
        self._handle = family.denoiser.register_forward_pre_hook(self._record, with_kwargs=True)
        original = self._original = family.noisy_latents_and_target

        def spy(x0, noise, timesteps):
            sigmas = family.sigmas_for(timesteps) if hasattr(family, "sigmas_for") else None
            self.draws.append((noise.clone(), timesteps.clone(), sigmas))
            return original(x0, noise, timesteps)

        family.noisy_latents_and_target = spy
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        del self.family.noisy_latents_and_target  # back to the class's method
        return False


def assert_grpo_training_repeats_rollout(recorder, sampling_steps: int, trained_steps: list[int]) -> None:
    """A GRPO run's recorded denoiser calls (one rollout of `sampling_steps` steps, then per trained step the policy's
    and the reference's): every training call's tensor inputs are those of the rollout's call at that step. A step
    is one call, or two where the pipeline runs guidance's unconditional branch as a second forward (Wan, FLUX.2
    [klein]): then training makes the same two calls, in the same order."""
    per_step, rest = divmod(len(recorder.calls), sampling_steps + 2 * len(trained_steps))
    assert per_step in (1, 2) and rest == 0, len(recorder.calls)  # policy, then reference (adapter off), per step
    rollout_calls, training_calls = recorder.calls[: sampling_steps * per_step], recorder.calls[sampling_steps * per_step:]
    for k, j in enumerate(trained_steps):
        for model in range(2):
            for i in range(per_step):
                call, rollout_call = training_calls[(2 * k + model) * per_step + i], rollout_calls[j * per_step + i]
                assert call.keys() == rollout_call.keys()
                for key, value in call.items():
                    expected = rollout_call[key]
                    if expected.ndim == 0:  # SD's pipeline passes one timestep for the batch
                        expected = expected.expand(value.shape)
                    assert torch.equal(value.float(), expected.float()), (j, key)


@contextlib.contextmanager
def recording_text_encoding(trainer):
    """While training: (the optimizer step of each text-encoder forward, the `encoder_hidden_states` every denoiser
    forward through `family.predict` conditions on). The hook and the wrapper are removed on exit."""
    family, encoded, seen = trainer.family, [], []
    (encoder,) = family.text_encoders
    hook = encoder.register_forward_pre_hook(lambda module, args: encoded.append(trainer.state.global_step))
    predict = family.predict

    def recording_predict(denoiser, noisy, timesteps, conditioning):
        seen.append(conditioning["encoder_hidden_states"])
        return predict(denoiser, noisy, timesteps, conditioning)

    family.predict = recording_predict
    try:
        yield encoded, seen
    finally:
        hook.remove()
        del family.predict


def write_jsonl_pairs(directory, pairs):
    """`pairs` as a .jsonl file of prompts and image file paths (the images written next to it); returns its path."""
    rows = []
    for i, row in enumerate(pairs):
        for side in ("chosen", "rejected"):
            row[side].save(directory / f"{side}{i}.png")
        rows.append({"prompt": row["prompt"], "chosen": str(directory / f"chosen{i}.png"),
                     "rejected": str(directory / f"rejected{i}.png")})
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def count_sampled(monkeypatch, module) -> list[str]:
    """Record the prompt of every image `module` samples through its `iter_sample_batches` (a resumed run samples
    only what is missing); returns the list it fills."""
    sampled = []
    real = module.iter_sample_batches

    def counting(pipe, prompts, *args, **kwargs):
        sampled.extend(prompts)
        return real(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(module, "iter_sample_batches", counting)
    return sampled
