"""The `diffusion-dpo` command: help, YAML config with overrides, bad input, and tiny end-to-end runs per family."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from datasets import DatasetDict
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import render, write_jsonl_pairs

import diffusion_dpo_trainer
from diffusion_dpo_trainer import DiffusionDPOConfig, cli

# Flags every tiny end-to-end run needs: a few steps at the tiny models' 32 px, no reporting, no checkpoints.
TINY_RUN = ["--max_steps", "2", "--resolution", "32", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--dataloader_pin_memory", "false",
            "--lora_r", "4", "--lora_alpha", "4", "--seed", "0"]


def exit_code_and_output(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


# ----- help --------------------------------------------------------------------------------------------------------
def test_top_level_help_lists_the_commands(capsys):
    code, output = exit_code_and_output(capsys, ["--help"])
    assert code == 0
    assert all(name in output for name in ("train", "build-pairs", "evaluate")) and "Diffusion-DPO" in output


def test_train_help_lists_every_config_and_script_field_with_ours_first(capsys):
    code, output = exit_code_and_output(capsys, ["train", "--help"])
    assert code == 0
    names = [f.name for f in dataclasses.fields(DiffusionDPOConfig) if f.init]
    names += [f.name for f in dataclasses.fields(cli.ScriptArguments)]
    missing = [name for name in names if f"--{name} " not in output]
    assert not missing
    own, _ = cli.split_config_fields()
    inherited_header = output.index("transformers.TrainingArguments options")
    assert all(output.index(f"--{f.name} ") < inherited_header for f in own)


def test_help_survives_percent_signs_in_help_texts():
    @dataclasses.dataclass
    class Args:
        ratio: float = dataclasses.field(default=0.5, metadata={"help": "Keep 50% of pairs (100%% is all)."})

    text = cli.DiffusionDPOParser([Args], prog="x").format_help()
    assert "Keep 50% of pairs (100% is all)." in " ".join(text.split())


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "diffusion_dpo_trainer", "--version"], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0 and "diffusion-dpo" in result.stdout
    assert diffusion_dpo_trainer.__version__ in result.stdout


def test_script_options_and_config_fields_do_not_collide():
    """A config field added with a script option's name would make every flag parser fail to build."""
    script = {f.name for f in dataclasses.fields(cli.ScriptArguments)}
    config = {f.name for f in dataclasses.fields(DiffusionDPOConfig)}
    assert not script & config, f"rename the script option(s) {sorted(script & config)} in cli.ScriptArguments"


# ----- parsing -----------------------------------------------------------------------------------------------------
def test_yaml_config_with_command_line_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION_DPO_TEST_ENV", raising=False)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
        "dataset_name": "yuvalkirstain/pickapic_v2",
        "output_dir": str(tmp_path / "out"),
        "beta": 2500,
        "learning_rate": 1e-5,
        "lora_target_modules": ["to_q", "to_v"],
        "model_init_kwargs": {"variant": "fp16"},
        "env": {"DIFFUSION_DPO_TEST_ENV": "set"},
    }))
    script_args, args = cli.parse_train_args(
        ["--config", str(config), "--beta", "5000", "--lora_r", "16", "--full_finetune"]
    )
    assert args.beta == 5000  # the command line wins over the file
    assert args.learning_rate == 1e-5  # the file wins over the default
    assert script_args.lora_r == 16 and script_args.full_finetune is True
    assert script_args.lora_target_modules == ["to_q", "to_v"]
    assert args.model_init_kwargs == {"variant": "fp16"}
    assert script_args.model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert args.loss_type == "sigmoid"  # a plain default of a list-typed field survives the parser
    assert os.environ["DIFFUSION_DPO_TEST_ENV"] == "set"


def test_flags_alone_without_config(tmp_path):
    script_args, args = cli.parse_train_args(
        ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--loss_type", "sigmoid",
         "--model_init_kwargs", '{"torch_dtype": "bfloat16"}', "--dataset_test_split", "test"]
    )
    assert args.loss_type == ["sigmoid"] and args.model_init_kwargs == {"torch_dtype": "bfloat16"}
    assert script_args.dataset_test_split == "test" and script_args.lora_r == 8 and not script_args.full_finetune


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--model_name_or_path", "m", "--dataset_name", "d", "--lerning_rate", "1e-4"],
         r"unrecognized arguments: --lerning_rate 1e-4.*did you mean --learning_rate\?"),
        (["train", "--model_name_or_path", "m", "--dataset_name", "d", "--beta", "abc"],
         r"argument --beta: invalid float value: 'abc'"),
        (["train", "--dataset_name", "d"], r"the following arguments are required: --model_name_or_path"),
        (["train", "--model_name_or_path", "m", "--dataset_name", "d", "--optim", "adam9000"],
         r"argument --optim: invalid choice: 'adam9000'"),
        (["trian"], r"invalid choice: 'trian'"),
        ([], r"the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(capsys, argv, expected):
    code, output = exit_code_and_output(capsys, argv)
    assert code == 2
    assert re.search(expected, " ".join(output.split())), output


def test_unknown_config_key_and_invalid_combination_are_named(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("model_name_or_path: m\ndataset_name: d\nbetta: 5000\n")
    code, output = exit_code_and_output(capsys, ["train", "--config", str(config)])
    assert code == 2 and "--betta 5000" in output and "did you mean --beta?" in output

    code, output = exit_code_and_output(capsys, ["train", "--model_name_or_path", "m", "--dataset_name", "d",
                                                 "--output_dir", str(tmp_path), "--load_best_model_at_end",
                                                 "--eval_strategy", "steps", "--save_strategy", "no"])
    assert code == 2 and "load_best_model_at_end" in output  # TrainingArguments' own check, as a usage error


# ----- data loading ------------------------------------------------------------------------------------------------
def test_load_split_reads_saved_datasets_and_files(tmp_path, pairs):
    pairs.save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": pairs, "test": pairs.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    rows = [{"prompt": p, "chosen": f"c{i}.png", "rejected": f"r{i}.png"} for i, p in enumerate(pairs["prompt"])]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    assert cli.load_split(str(tmp_path / "single"), None, "train")["prompt"] == pairs["prompt"]
    assert len(cli.load_split(str(tmp_path / "dict"), None, "test")) == 2
    # relative image paths are read against the data file's folder (docs/cli.md#data)
    assert cli.load_split(str(tmp_path / "pairs.jsonl"), None, "train")["chosen"][3] == str(tmp_path / "c3.png")
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\], not 'validation'"):
        cli.load_split(str(tmp_path / "dict"), None, "validation")
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ValueError, match=r"supported files are .json, .jsonl, .parquet, .csv"):
        cli.load_split(str(tmp_path / "pairs.txt"), None, "train")


def test_vae_name_or_path_replaces_the_pipeline_vae(tmp_path, sdxl_path):
    vae = AutoencoderKL.from_pretrained(sdxl_path, subfolder="vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01)
    vae.save_pretrained(tmp_path / "fixed-vae")
    script_args, args = cli.parse_train_args(["--model_name_or_path", sdxl_path, "--dataset_name", "d",
                                              "--output_dir", str(tmp_path), "--vae_name_or_path",
                                              str(tmp_path / "fixed-vae")])
    pipe = cli.load_model(script_args, args)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    for name, value in vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name


# ----- end to end --------------------------------------------------------------------------------------------------
def test_sd_cli_run_writes_a_loadable_lora_and_evaluates(tmp_path, sd_path, pairs, trainers):
    data = tmp_path / "data"
    DatasetDict({"train": pairs, "test": pairs.select(range(2))}).save_to_disk(str(data))
    out = tmp_path / "out"
    code = cli.main(["train", "--model_name_or_path", sd_path, "--dataset_name", str(data), "--output_dir", str(out),
                     "--dataset_test_split", "test", "--eval_strategy", "steps", "--eval_steps", "2", *TINY_RUN])
    assert code == 0
    (trainer,) = trainers
    assert len(trainer.train_dataset) == len(pairs) and len(trainer.eval_dataset) == 2
    history = trainer.state.log_history
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh LoRA is the reference
    assert any("eval_loss" in h for h in history)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    before = render(pipe)
    pipe.load_lora_weights(str(out))
    assert pipe.unet.peft_config["default_0"].r == 4
    assert not np.allclose(before, render(pipe))


def test_sdxl_cli_run_from_jsonl_with_image_paths_writes_a_loadable_lora(tmp_path, sdxl_path, pairs):
    data = write_jsonl_pairs(tmp_path, pairs)
    out = tmp_path / "out"
    code = cli.main(["train", "--model_name_or_path", sdxl_path, "--dataset_name", str(data),
                     "--output_dir", str(out), *TINY_RUN])
    assert code == 0

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    before = render(pipe)
    pipe.load_lora_weights(str(out))
    assert not np.allclose(before, render(pipe))


def test_full_finetune_cli_run_saves_the_denoiser(tmp_path, sd_path, pairs):
    pairs.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "out"
    code = cli.main(["train", "--model_name_or_path", sd_path, "--dataset_name", str(tmp_path / "data"),
                     "--output_dir", str(out), "--full_finetune", *TINY_RUN])
    assert code == 0
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))


def test_build_pairs_and_evaluate_commands(tmp_path, sd_path, capsys):
    """`build-pairs` saves scored pairs loadable by `train`; `evaluate` of a model against itself is all ties."""
    from datasets import load_from_disk

    from diffusion_dpo_trainer.testing import make_clip_model

    reward = f"clip:{make_clip_model(tmp_path / 'clip')}"
    common = ["--model", sd_path, "--reward", reward, "--num_inference_steps", "2", "--resolution", "32"]
    out = tmp_path / "pairs"
    assert cli.main(["build-pairs", *common, "--prompt", "a red square", "--prompt", "a blue cat",
                     "--num_images_per_prompt", "3", "--output_dir", str(out)]) == 0
    pairs = load_from_disk(str(out))
    assert sorted(pairs["prompt"]) == ["a blue cat", "a red square"]  # best vs worst: one pair per prompt
    assert all(c > r for c, r in zip(pairs["chosen_score"], pairs["rejected_score"]))

    result_file = tmp_path / "win_rate.json"
    assert cli.main(["evaluate", *common, "--prompt", "a red square", "--reference_model", sd_path,
                     "--seeds", "0", "1", "--output_file", str(result_file)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["win_rate"] == 0.5 and summary["ties"] == 2
    assert len(json.loads(result_file.read_text())["comparisons"]) == 2


def test_sampling_commands_reject_missing_options(sd_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--model", sd_path, "--prompt", "a cat"])
    assert exit_info.value.code == 2
    assert "--lora" in capsys.readouterr().err
