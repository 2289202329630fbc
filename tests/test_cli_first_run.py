"""What a new user meets first: the CLI's LoRA targets, its error messages and exit codes, streaming, and a quiet run."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
from datasets import Dataset
from helpers import count_sampled, lora, write_jsonl_pairs
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open

from diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer, cli

ROOT = Path(__file__).resolve().parent.parent
# A few steps at the tiny models' 32 px, no reporting, no checkpoints.
TINY_RUN = ["--max_steps", "1", "--resolution", "32", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--lora_r", "4", "--lora_alpha", "4", "--seed", "0"]


def lora_modules(keys) -> set[str]:
    """Names of the modules that carry an adapter, from PEFT-format state-dict keys."""
    return {key.split(".lora_")[0].removeprefix("transformer.").removeprefix("unet.") for key in keys}


# ----- LoRA targets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family_path", ["sd3_path", "flux_path"])
def test_cli_trains_the_same_lora_modules_as_python(tmp_path, request, pairs, family_path):
    """Without --lora_target_modules the CLI gets the family's default targets, exactly as the Python API does."""
    model = request.getfixturevalue(family_path)
    pairs.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "out"
    assert cli.main(["train", "--model_name_or_path", model, "--dataset_name", str(tmp_path / "data"),
                     "--output_dir", str(out), *TINY_RUN]) == 0
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        from_cli = lora_modules(f.keys())

    trainer = DiffusionDPOTrainer(model=model, args=DiffusionDPOConfig(output_dir=str(tmp_path / "py")),
                                  train_dataset=pairs, peft_config=LoraConfig(r=4, lora_alpha=4))
    from_python = lora_modules(get_peft_model_state_dict(trainer.model).keys())
    assert from_cli == from_python
    # ... and those are the family's documented targets, every one of them present.
    targets = trainer.family.lora_target_modules
    assert len(targets) == 8 and {"add_q_proj", "to_add_out"} <= set(targets)
    matched = {next(t for t in targets if name == t or name.endswith("." + t)) for name in from_cli}
    assert matched == set(targets)


def test_explicit_lora_target_modules_still_apply(tmp_path, sd3_path):
    script_args, _ = cli.parse_train_args(["--model_name_or_path", sd3_path, "--dataset_name", "d", "--output_dir",
                                           str(tmp_path), "--lora_target_modules", "to_q", "to_v"])
    assert script_args.lora_target_modules == ["to_q", "to_v"]
    script_args, _ = cli.parse_train_args(["--model_name_or_path", sd3_path, "--dataset_name", "d", "--output_dir",
                                           str(tmp_path)])
    assert script_args.lora_target_modules is None


# ----- errors ------------------------------------------------------------------------------------------------------
def train_argv(model, data, out):
    return ["train", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            *TINY_RUN]


def single_error(capsys) -> str:
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    errors = [line for line in out.err.splitlines() if "error:" in line]
    assert len(errors) == 1, out.err
    return errors[0]


def test_missing_model_path_is_one_message_and_exit_2(tmp_path, pairs, capsys):
    pairs.save_to_disk(str(tmp_path / "data"))
    missing = tmp_path / "no-such-model"
    assert cli.main(train_argv(missing, tmp_path / "data", tmp_path / "out")) == 2
    message = single_error(capsys)
    assert f"'{missing}' does not exist" in message and "model_index.json" in message
    # A directory that is not a pipeline is named as such.
    (tmp_path / "not-a-pipeline").mkdir()
    assert cli.main(train_argv(tmp_path / "not-a-pipeline", tmp_path / "data", tmp_path / "out")) == 2
    assert "without a model_index.json" in single_error(capsys)


def test_dataset_matching_no_format_is_one_message_and_exit_2(tmp_path, sd_path, capsys, monkeypatch):
    Dataset.from_dict({"text": ["a", "b"], "picture": ["x.png", "y.png"]}).save_to_disk(str(tmp_path / "data"))
    assert cli.main(train_argv(sd_path, tmp_path / "data", tmp_path / "out")) == 2
    message = single_error(capsys)
    assert "match no supported format" in message and "['prompt', 'chosen', 'rejected']" in message
    # --debug (before the command) and DIFFUSION_DPO_DEBUG=1 let the exception (and its traceback) through.
    with pytest.raises(ValueError, match="match no supported format"):
        cli.main(["--debug", *train_argv(sd_path, tmp_path / "data", tmp_path / "out")])
    monkeypatch.setenv("DIFFUSION_DPO_DEBUG", "1")
    with pytest.raises(ValueError, match="match no supported format"):
        cli.main(train_argv(sd_path, tmp_path / "data", tmp_path / "out"))


def test_error_exit_status_of_the_installed_command(tmp_path):
    """The real process exits with status 2 and prints no traceback."""
    Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "data"))
    argv = [sys.executable, "-m", "diffusion_dpo_trainer", *train_argv(tmp_path / "missing", tmp_path / "data",
                                                                        tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSION_DPO_DEBUG", None)
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


# ----- streaming ---------------------------------------------------------------------------------------------------
def test_cli_streams_a_local_dataset(tmp_path, sd_path, pairs, trainers):
    data = write_jsonl_pairs(tmp_path, pairs)
    out = tmp_path / "out"
    argv = train_argv(sd_path, data, out) + ["--dataset_streaming", "true", "--max_steps", "3"]
    assert cli.main(argv) == 0
    (trainer,) = trainers
    assert isinstance(trainer.train_dataset, datasets.IterableDataset)
    assert trainer.state.global_step == 3
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # A save_to_disk directory streams too.
    pairs.save_to_disk(str(tmp_path / "saved"))
    streamed = cli.load_split(str(tmp_path / "saved"), None, "train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["prompt"] for row in streamed] == pairs["prompt"]


@pytest.mark.parametrize("extra, message", [
    (["--max_steps", "-1"], "dataset_streaming needs max_steps"),
    (["--precompute_latents", "true"], "cannot be combined with precompute_latents"),
    (["--dataset_train_split", "train[:4]"], "the slice 'train[:4]' is not available"),
])
def test_options_streaming_rules_out_are_named(tmp_path, pairs, capsys, extra, message):
    pairs.save_to_disk(str(tmp_path / "data"))
    argv = train_argv(tmp_path / "never-loaded", tmp_path / "data", tmp_path / "out")
    assert cli.main([*argv, "--dataset_streaming", "true", *extra]) == 2
    assert message in single_error(capsys)


# ----- a quiet first run -------------------------------------------------------------------------------------------
def test_a_cpu_run_prints_no_warning_of_ours(tmp_path, sd_path, pairs, capfd):
    """Neither diffusers' 'modules ... should be kept in float32' (from casting the VAE to its own dtype) nor the
    DataLoader's pin_memory warning (pinning without an accelerator): both came from our calls."""
    args = DiffusionDPOConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=2,
                              max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs, peft_config=lora()).train()
    messages = [str(w.message) for w in caught] + capfd.readouterr().err.splitlines()
    assert not [m for m in messages if "pin_memory" in m or "should be kept in float32" in m], messages


# ----- a run that can never complete a step ------------------------------------------------------------------------
def test_stream_shorter_than_one_step_is_refused_with_its_numbers(tmp_path, sd_path, pairs, capsys):
    """The quickstart's hang: 3 streamed rows, 2 x 4 rows per optimizer step. The Trainer would pass over the stream
    forever without stepping; the run is refused before its first step, naming the numbers."""
    data = write_jsonl_pairs(tmp_path, pairs.select(range(3)))
    argv = train_argv(sd_path, data, tmp_path / "out") + ["--dataset_streaming", "true", "--max_steps", "3",
                                                          "--gradient_accumulation_steps", "4"]
    assert cli.main(argv) == 2
    message = single_error(capsys)
    assert "stream of 3 rows" in message and "per_device_train_batch_size 2 x gradient_accumulation_steps 4" in message
    assert "= 8" in message
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_dataset_smaller_than_a_dropped_batch_is_refused(tmp_path, sd_path, pairs):
    args = DiffusionDPOConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4,
                              max_steps=1, report_to="none", save_strategy="no", dataloader_drop_last=True)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=pairs.select(range(3)), peft_config=lora())
    with pytest.raises(ValueError, match=r"has 3 rows, fewer than one batch \(per_device_train_batch_size 4"):
        trainer.train()


def test_stream_workers_fit_its_shards(tmp_path, sd_path, pairs):
    """A one-file stream has one shard: more workers would each print 'Too many dataloader workers' on every pass."""
    stream = cli.load_split(str(write_jsonl_pairs(tmp_path, pairs)), None, "train", streaming=True)
    args = DiffusionDPOConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=2,
                              max_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=4)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=stream, peft_config=lora())
    with pytest.warns(UserWarning, match=r"dataloader_num_workers=4, but the training stream has 1 shard"):
        loader = trainer.get_train_dataloader()
    assert loader.num_workers == 1
    assert args.dataloader_num_workers == 4  # the user's config is left as given


# ----- bad input in every layout: one message, exit 2 --------------------------------------------------------------
def _empty_layouts(tmp_path):
    empty = {"prompt": [], "chosen": [], "rejected": []}
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.csv").write_text("")
    Dataset.from_dict(empty).to_parquet(str(tmp_path / "empty.parquet"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "metadata.jsonl").write_text("")
    Dataset.from_dict(empty).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": Dataset.from_dict(empty)}).save_to_disk(str(tmp_path / "saved_dict"))
    return {"empty.jsonl": "is empty", "empty.csv": "is empty", "empty.parquet": "is empty",
            "folder": "metadata.jsonl is empty", "saved": "is an empty dataset", "saved_dict": "is an empty dataset"}


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_an_empty_dataset_in_any_layout_is_one_message(tmp_path, sd_path, capsys, streaming):
    for name, expected in _empty_layouts(tmp_path).items():
        argv = train_argv(sd_path, tmp_path / name, tmp_path / "out") + ["--dataset_streaming", streaming]
        assert cli.main(argv) == 2, name
        message = single_error(capsys)
        assert expected in message and name in message, message


def test_a_split_a_saved_dataset_lacks_is_an_error(tmp_path, pairs, capsys):
    """A single saved Dataset has no test split: its rows were silently reused as the evaluation set."""
    pairs.save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"single dataset \(Dataset.save_to_disk\), with no 'validation' split"):
        cli.load_split(str(tmp_path / "data"), None, "validation")
    assert len(cli.load_split(str(tmp_path / "data"), None, "train")) == len(pairs)
    datasets.DatasetDict({"train": pairs}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'test'"):
        cli.load_split(str(tmp_path / "dict"), None, "test")


@pytest.mark.parametrize("yaml_text, message", [
    ("model_name_or_path: x\n  bad: [1, 2\n", r"not valid YAML: mapping values are not allowed here .*line 2"),
    ("resolution: -64\n", r"resolution must be a positive whole number of pixels, got -64"),
    ("resolution: 512.5\n", r"resolution must be a positive whole number of pixels, got 512.5"),
    ("resolution: 0\n", r"resolution must be a positive whole number of pixels, got 0"),
])
def test_bad_config_values_are_one_message_before_loading(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", str(config), "--model_name_or_path", str(tmp_path / "never-loaded"),
                  "--dataset_name", "d", "--output_dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_lora_target_modules_as_a_yaml_string_is_one_module(tmp_path):
    """PEFT would read a string as a regex matching whole module names: `to_q` alone would match nothing."""
    config = tmp_path / "recipe.yaml"
    config.write_text("lora_target_modules: to_q\n")
    script_args, _ = cli.parse_train_args(["--config", str(config), "--model_name_or_path", "m", "--dataset_name", "d",
                                           "--output_dir", str(tmp_path)])
    assert script_args.lora_target_modules == ["to_q"]


def test_sampling_resolution_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", "--model", "m", "--prompt", "p", "--lora", "l", "--resolution", "0"])
    assert info.value.code == 2
    assert "expected a positive number of pixels, got 0" in capsys.readouterr().err


def test_module_named_nan_or_inf_is_a_function_not_a_weight(tmp_path, monkeypatch):
    from diffusion_dpo_trainer.rewards import load_reward

    (tmp_path / "my_rewards.py").write_text("def nan(images, prompts):\n    return [1.0] * len(images)\n"
                                            "inf = nan\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_rewards

    assert load_reward("my_rewards:nan") is my_rewards.nan
    assert load_reward("my_rewards:inf") is my_rewards.inf


# ----- a reward that raises: one message, and a rerun resumes --------------------------------------------------------
FLAKY_REWARD = '''
import numpy as np

calls = []


def brightness(images, prompts):
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


def fails_on_second_call(images, prompts):
    calls.append(len(images))
    if len(calls) == 2:
        raise RuntimeError("CUDA out of memory (simulated)")
    return brightness(images, prompts)
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A `package.module:function` reward in the working directory, found without PYTHONPATH."""
    (tmp_path / "flaky_rewards.py").write_text(FLAKY_REWARD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "flaky_rewards", raising=False)
    return "flaky_rewards"


def test_build_pairs_reward_failure_is_one_message_and_a_rerun_resumes(tmp_path, sd_path, capsys, monkeypatch,
                                                                       reward_module):
    from diffusion_dpo_trainer import feedback

    sampled = count_sampled(monkeypatch, feedback)
    out = tmp_path / "pairs"
    common = ["build-pairs", "--model", sd_path, "--num_inference_steps", "2", "--resolution", "32", "--prompt", "a",
              "--prompt", "b", "--num_images_per_prompt", "2", "--batch_size", "2", "--output_dir", str(out)]
    assert cli.main([*common, "--reward", f"{reward_module}:fails_on_second_call"]) == 2
    message = single_error(capsys)
    assert "the reward 'flaky_rewards:fails_on_second_call' failed on a batch of 2 images" in message
    assert "RuntimeError: CUDA out of memory (simulated)" in message and "resumes" in message
    assert len(sampled) == 4  # both batches were sampled; the second one's scoring failed
    sampled.clear()
    assert cli.main([*common, "--reward", f"{reward_module}:brightness"]) == 0
    assert sampled == []  # every image was read back
    assert not (tmp_path / "pairs.samples").exists()
    assert len(datasets.load_from_disk(str(out))) == 2


def test_a_reward_returning_a_non_number_is_one_message(tmp_path, sd_path, capsys, reward_module):
    (tmp_path / "word_rewards.py").write_text("def word(images, prompts):\n    return ['high'] * len(images)\n")
    argv = ["build-pairs", "--model", sd_path, "--num_inference_steps", "2", "--resolution", "32", "--prompt", "a",
            "--num_images_per_prompt", "2", "--output_dir", str(tmp_path / "pairs"), "--reward", "word_rewards:word"]
    assert cli.main(argv) == 2
    assert "returned 'high' (str) for image 0" in single_error(capsys)


def test_a_missing_reward_module_fails_before_the_pipeline_loads(tmp_path, capsys, reward_module):
    argv = ["build-pairs", "--model", str(tmp_path / "never-loaded"), "--prompt", "a", "--output_dir", str(tmp_path / "o")]
    assert cli.main([*argv, "--reward", "no_such_module:score"]) == 2
    assert "Could not import reward 'no_such_module:score'" in single_error(capsys)


def test_evaluate_reward_failure_is_one_message_and_a_rerun_resumes(tmp_path, sd_path, capsys, monkeypatch,
                                                                    reward_module):
    from diffusion_dpo_trainer import protocol

    sampled = count_sampled(monkeypatch, protocol)
    (tmp_path / "prompts.txt").write_text("a\nb\nc\nd\n")
    common = ["evaluate", "--model", sd_path, "--base_only", "--prompt_set", str(tmp_path / "prompts.txt"),
              "--num_inference_steps", "2", "--resolution", "32", "--batch_size", "2", "--output_dir",
              str(tmp_path / "eval")]
    assert cli.main([*common, "--reward", f"{reward_module}:fails_on_second_call"]) == 2
    assert "failed on a batch of 2 images" in single_error(capsys)
    assert len((tmp_path / "eval" / "scores.jsonl").read_text().splitlines()) == 2  # the first batch is kept
    sampled.clear()
    # the same command (a fixed reward under the same name) samples only the second batch
    (tmp_path / "flaky_rewards.py").write_text(FLAKY_REWARD.replace("len(calls) == 2", "False"))
    monkeypatch.delitem(sys.modules, "flaky_rewards", raising=False)
    assert cli.main([*common, "--reward", f"{reward_module}:fails_on_second_call"]) == 0
    assert len(sampled) == 2


def test_model_card_names_a_local_dataset(tmp_path, sd_path, pairs):
    """Trained on a local .jsonl, the card said `Dataset: json` and listed `json` as a Hub dataset in its metadata."""
    data = write_jsonl_pairs(tmp_path, pairs)
    out = tmp_path / "out"
    assert cli.main(train_argv(sd_path, data, out)) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"- Dataset: `{data}` (local)" in card
    assert "datasets:" not in card  # no Hub metadata pointing nowhere
    from diffusion_dpo_trainer.model_card import render_model_card

    hub = render_model_card(base_model=None, pipeline_class="P", denoiser_name="unet", denoiser_class="U",
                            is_lora=True, loss_type="sigmoid", hyperparameters={}, dataset="json")
    assert "local json files" in hub and "datasets:" not in hub


@pytest.mark.parametrize("streaming", [False, True])
def test_relative_image_paths_in_a_data_file_resolve_against_its_folder(tmp_path, pairs, monkeypatch, streaming):
    data = write_jsonl_pairs(tmp_path, pairs.select(range(2)))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        row["chosen"] = os.path.basename(row["chosen"])  # "chosen0.png", next to the file
    data.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path.parent)  # run from elsewhere
    loaded = cli.load_split(str(data), None, "train", streaming=streaming)
    assert loaded.column_names == ["prompt", "chosen", "rejected"]  # a stream keeps knowing its columns
    assert [row["chosen"] for row in loaded] == [str(tmp_path / "chosen0.png"), str(tmp_path / "chosen1.png")]
    assert [row["rejected"] for row in loaded] == [r["rejected"] for r in rows]  # absolute paths stay


def test_a_very_long_prompt_is_one_warning_naming_its_row(tmp_path, sd_path, pairs, capfd):
    """diffusers logged the cut-off text (here 10,000 characters) on every encode of the row: now one warning."""
    long = pairs.map(lambda row, i: {"prompt": "a red square " * 800 if i == 2 else row["prompt"]}, with_indices=True)
    args = DiffusionDPOConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4,
                              max_steps=4, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = DiffusionDPOTrainer(model=sd_path, args=args, train_dataset=long, peft_config=lora())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()  # 4 steps over 8 rows: row 2 is encoded twice
    notices = [str(w.message) for w in caught if "longer than the text encoder reads" in str(w.message)]
    assert notices == ["Row 2: the prompt (10400 characters) is longer than the text encoder reads, so its end is cut "
                       "off (warned once per run; any other long prompt is cut alike)."]
    assert "a red square a red square" not in capfd.readouterr().err


def test_a_trl_style_reward_keeps_its_calling_convention_through_the_cli(tmp_path, sd_path, monkeypatch,
                                                                          reward_module):
    (tmp_path / "trl_rewards.py").write_text(
        "import numpy as np\n\n"
        "def brightness(prompts, completions, **kwargs):\n"
        "    return [float(np.asarray(image, dtype=np.float64).mean()) for image in completions]\n")
    out = tmp_path / "pairs"
    assert cli.main(["build-pairs", "--model", sd_path, "--num_inference_steps", "2", "--resolution", "32", "--prompt",
                     "a", "--num_images_per_prompt", "2", "--output_dir", str(out),
                     "--reward", "trl_rewards:brightness"]) == 0
