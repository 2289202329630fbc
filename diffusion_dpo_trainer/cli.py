"""The `diffusion-dpo` command: `diffusion-dpo train --config recipe.yaml [--any_field value ...]`.

Every `DiffusionDPOConfig` field (and so every `TrainingArguments` field) is a flag, parsed by TRL's `TrlParser`, which
also reads `--config file.yaml` (flags given on the command line override the file). `ScriptArguments` adds what a
script needs besides the config: which model, which data, which adapter.

The command is a plain Python entry point, so it runs unchanged under `accelerate launch`:
`accelerate launch -m diffusion_dpo_trainer train ...` or `accelerate launch $(which diffusion-dpo) train ...`.

A subcommand is a name, a one-line help and a function of the remaining arguments: add one to `COMMANDS`.
"""

import argparse
import dataclasses
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import TrainingArguments
from trl import TrlParser

from ._version import __version__
from .config import DiffusionDPOConfig
from .formats import FOLDER_METADATA, load_preference_folder

PROG = "diffusion-dpo"
#: Set to 1 (or pass `diffusion-dpo --debug COMMAND ...`) to see the traceback behind an error message.
DEBUG_ENV = "DIFFUSION_DPO_DEBUG"
#: Errors about the user's input or environment, whose message says what to fix: printed without a traceback.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)
DEFAULT_REWARD = "pickscore"
# What `evaluate --prompt_set` reports by default: the rewards papers on Diffusion-DPO and its successors quote.
PROTOCOL_REWARDS = ["pickscore", "hpsv2.1", "imagereward", "aesthetic", "clip"]
PROTOCOL_RESUME = (" The images sampled and the scores computed so far are kept in --output_dir: the same command "
                   "resumes from them.")
BUILD_PAIRS_RESUME = PROTOCOL_RESUME
# Local files that `datasets` reads with a builder named after their format.
# Columns that may hold image or video file paths, in every supported layout.
MEDIA_COLUMNS = ("chosen", "rejected", "jpg_0", "jpg_1", "image", "video")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class ScriptArguments:
    """What `diffusion-dpo train` needs besides `DiffusionDPOConfig`. Names follow TRL's scripts."""

    _argument_group_name = "Model, data and adapter (diffusion-dpo train only)"

    model_name_or_path: str = field(
        metadata={"help": "The diffusers pipeline to train: a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) "
                  "or a local directory with a model_index.json."}
    )
    dataset_name: str = field(
        metadata={"help": "The preference data: a hub dataset id, a directory written by `save_to_disk`, a data "
                  "directory `datasets` can read, or a .json/.jsonl/.parquet/.csv file."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of a hub dataset, when it has several."}
    )
    dataset_train_split: str = field(
        default="train", metadata={"help": "Split to train on. Slices work for hub datasets, e.g. `train[:10000]`."}
    )
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on; used only when `eval_strategy` is not `no`."}
    )
    dataset_streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset (`datasets.load_dataset(..., streaming=True)`) instead of downloading "
                  "and preparing it first: training starts after the first rows arrive. Needs `max_steps`; rules "
                  "out split slices, `precompute_latents` and `precompute_text_embeddings`."},
    )
    vae_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Replace the pipeline's VAE, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16 (the "
                  "stock SDXL VAE overflows in fp16)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A different pipeline (id or path) whose denoiser is the reference. By default the "
                  "reference is the base model: the adapter switched off (LoRA) or a frozen copy (full fine-tune)."},
    )
    full_finetune: bool = field(
        default=False, metadata={"help": "Train every weight of the denoiser instead of a LoRA adapter."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Names of the denoiser's modules that get an adapter. Default: the model family's own, as "
                  "in Python (docs/models.md lists each family's)."},
    )


    def __post_init__(self):
        if isinstance(self.lora_target_modules, str):  # `lora_target_modules: to_q` in YAML: one module, not a regex
            self.lora_target_modules = [self.lora_target_modules]


class DiffusionDPOParser(TrlParser):
    """`TrlParser` that lists our own fields before the (long) inherited `TrainingArguments` in `--help`, keeps plain
    defaults of list-typed fields, and accepts a bare `%` in help texts (argparse would crash on `--help`)."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        # HfArgumentParser drops the plain (non-factory) default of a list-typed field such as `loss_type: str |
        # list[str] = "sigmoid"`, which would reach the config as None. (Empty defaults, like `debug=""`, mean None.)
        for dtype in self.dataclass_types:
            for config_field in dataclasses.fields(dtype):
                default = config_field.default
                missing = self.get_default(config_field.name) is None
                if config_field.init and default is not dataclasses.MISSING and default and missing:
                    self.set_defaults(**{config_field.name: default})
        for action in self._actions:
            if action.help:
                action.help = re.sub(r"(?<!%)%(?![%(])", "%%", action.help)

    def _add_dataclass_arguments(self, dtype):
        if not (isinstance(dtype, type) and issubclass(dtype, TrainingArguments)):
            return super()._add_dataclass_arguments(dtype)
        hints = typing.get_type_hints(dtype)
        own_fields, inherited_fields = split_config_fields(dtype)
        for title, fields in (
            (f"{dtype.__name__} options", own_fields),
            ("transformers.TrainingArguments options (https://huggingface.co/docs/transformers/main_classes/trainer)",
             inherited_fields),
        ):
            group = self.add_argument_group(title)
            for config_field in fields:
                config_field.type = hints[config_field.name]
                self._parse_dataclass_field(group, config_field)


def split_config_fields(dtype=DiffusionDPOConfig) -> tuple[list[dataclasses.Field], list[dataclasses.Field]]:
    """`dtype`'s init fields in two lists: those it adds to `TrainingArguments`, and the inherited ones."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    fields = [f for f in dataclasses.fields(dtype) if f.init]
    return [f for f in fields if f.name not in inherited], [f for f in fields if f.name in inherited]


def make_train_parser(prog: str = f"{PROG} train") -> DiffusionDPOParser:
    return DiffusionDPOParser(
        (ScriptArguments, DiffusionDPOConfig),
        prog=prog,
        usage=f"{prog} [--config FILE.yaml] --model_name_or_path ID_OR_PATH --dataset_name ID_OR_PATH [options]",
        description="Fine-tune a diffusers text-to-image pipeline on preference pairs with Diffusion-DPO. Options "
        "come from --config FILE.yaml (any option below as a key) and from the command line, which wins.",
        allow_abbrev=False,
    )


def parse_train_args(argv: list[str]) -> tuple[ScriptArguments, DiffusionDPOConfig]:
    """Parse `--config` and flags; an unknown flag or config key, or an invalid value, exits with argparse's code 2."""
    import yaml

    parser = make_train_parser()
    try:
        script_args, training_args, unknown = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except yaml.YAMLError as exc:  # its message spans lines: the problem, then where it is
        parser.error(f"the --config file is not valid YAML: {' '.join(str(exc).split())}")
    except (ValueError, OSError) as exc:  # a YAML file of no mapping, or a value a config's __post_init__ rejects
        parser.error(str(exc))
    if unknown:
        known = [option for action in parser._actions for option in action.option_strings]
        hints = []
        for flag in (u for u in unknown if u.startswith("--")):
            close = difflib.get_close_matches(flag, known, n=1)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)}"
            + (f"; unknown options: {', '.join(hints)}" if hints else "")
            + ". Unknown keys in the --config file are reported the same way; see --help for every option."
        )
    return script_args, training_args


def load_split(
    name: str, config: str | None, split: str, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """One split from a hub id, an image folder with a metadata.jsonl, a `save_to_disk` directory or a data file;
    with `streaming`, as a `datasets.IterableDataset` that is read while training."""
    path = Path(name)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Cannot read {name!r}: supported files are {', '.join(FILE_BUILDERS)}.")
        if not _has_rows(path, builder):  # the builders fail on an empty file with messages that name no file
            raise ValueError(f"{name!r} is empty: there are no rows to train on.")
        from datasets.exceptions import DatasetGenerationError

        try:
            data = datasets.load_dataset(builder, data_files=str(path), split=split, streaming=streaming)
        except DatasetGenerationError as exc:  # its own message names no cause
            raise ValueError(f"Cannot read {name!r} as {builder}: {exc.__cause__ or exc}") from exc
        return _paths_relative_to(data, path.parent)
    if (path / FOLDER_METADATA).is_file():
        return load_preference_folder(path, streaming=streaming)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        data = _load_saved(path, split)
        return data.to_iterable_dataset() if streaming else data
    return datasets.load_dataset(name, config, split=split, streaming=streaming)


def _paths_relative_to(data, folder: Path):
    """Relative image/video file paths of a data file resolved against the file's folder (as an image folder's
    `metadata.jsonl` names its files), not against wherever the command runs."""
    features = data.features or {}
    columns = [c for c in MEDIA_COLUMNS if getattr(features.get(c), "dtype", None) == "string"]
    if not columns:
        return data

    def resolve(row):
        return {c: str(folder / row[c]) if row[c] and not os.path.isabs(row[c]) and "://" not in row[c] else row[c]
                for c in columns}

    return data.map(resolve, features=data.features)  # a stream's map would forget its columns otherwise


def _has_rows(path: Path, builder: str) -> bool:
    if builder == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows > 0
    with path.open("rb") as f:  # any non-blank byte, read in chunks (the file may be large)
        return any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    """One split of a `save_to_disk` folder. Only that split is loaded (`load_from_disk` of a whole DatasetDict fails
    on any empty split), and an empty one is named (`load_from_disk` raises an IndexError for it)."""
    import json

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if split not in splits:
            raise ValueError(f"{str(path)!r} has splits {splits}, not {split!r}.")
        path = path / split
    else:
        saved_split = json.loads((path / "state.json").read_text(encoding="utf-8")).get("_split")
        if split not in ("train", saved_split):  # one Dataset: its rows are no other split (never reuse them)
            raise ValueError(f"{str(path)!r} is a single dataset (Dataset.save_to_disk), with no {split!r} split: its "
                             f"rows are the training rows. Save a DatasetDict with a {split!r} split, or drop that "
                             "split option.")
    if not json.loads((path / "state.json").read_text(encoding="utf-8"))["_data_files"]:
        raise ValueError(f"{str(path)!r} is an empty dataset (saved with no rows): there are no rows to train on.")
    return datasets.load_from_disk(str(path))


def load_model(script_args: ScriptArguments, training_args: DiffusionDPOConfig):
    """The model argument for the trainer: the id/path, or the loaded pipeline when its VAE is replaced."""
    if script_args.vae_name_or_path is None:
        return script_args.model_name_or_path
    from diffusers import AutoencoderKL

    from .families import load_pipeline

    vae = AutoencoderKL.from_pretrained(script_args.vae_name_or_path, use_safetensors=True)
    kwargs = {**(training_args.model_init_kwargs or {}), "vae": vae}
    return load_pipeline(script_args.model_name_or_path, kwargs, require_family=True)


def train(argv: list[str]) -> int:
    script_args, training_args = parse_train_args(argv)
    if script_args.dataset_streaming:
        _check_streaming_options(script_args, training_args)
    from .families import family_class_of

    # A wrong model is reported before the dataset is downloaded or prepared, which can take hours.
    family_class_of(script_args.model_name_or_path, training_args.model_init_kwargs)
    from peft import LoraConfig

    from .trainer import DiffusionDPOTrainer

    def load(split):
        # Any supported layout (TRL pairs, Pick-a-Pic, labelled images for kto): the trainer detects and normalises it.
        data = load_split(script_args.dataset_name, script_args.dataset_config, split, script_args.dataset_streaming)
        data.info.dataset_name = script_args.dataset_name  # the model card names it (datasets keeps only a builder's)
        return data

    evaluate = script_args.dataset_test_split is not None and training_args.eval_strategy != "no"
    peft_config = None
    if not script_args.full_finetune:
        peft_config = LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules,
        )
    trainer = DiffusionDPOTrainer(
        model=load_model(script_args, training_args),
        ref_model=script_args.ref_model_name_or_path,
        args=training_args,
        train_dataset=load(script_args.dataset_train_split),
        eval_dataset=load(script_args.dataset_test_split) if evaluate else None,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return 0


def _check_streaming_options(script_args: ScriptArguments, training_args: DiffusionDPOConfig) -> None:
    """Before anything is downloaded: the options a stream rules out, named."""
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split and "[" in split:
            raise ValueError(f"dataset_streaming reads whole splits, so the slice {split!r} is not available: pass "
                             "the split's name and bound the run with max_steps.")
    if training_args.max_steps <= 0:
        raise ValueError("dataset_streaming needs max_steps: a stream has no length to count epochs from. Set "
                         "--max_steps, or turn streaming off (--dataset_streaming false) to train for num_train_epochs.")
    cached = [f for f in ("precompute_latents", "precompute_text_embeddings") if getattr(training_args, f)]
    if cached:
        raise ValueError(f"dataset_streaming cannot be combined with {' and '.join(cached)}: a stream is read once "
                         "per pass, so there is nothing to cache. Turn streaming off (--dataset_streaming false) to "
                         "cache, or the cache off to stream.")


# name -> (one-line help, function of the arguments after the name, returning an exit code)
def _sampling_parser(prog: str, description: str, prompt_sets: bool = False) -> argparse.ArgumentParser:
    """Options shared by the commands that sample from a pipeline and score the images with a reward."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="Pipeline to sample from: a hub id or a local path.")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="A prompt (repeat the flag for several).")
    prompts.add_argument("--prompts_file", help="A text file with one prompt per line.")
    if prompt_sets:
        prompts.add_argument(
            "--prompt_set", action="append", help="A published prompt set (parti, pickapic-test, "
            "pickapic-validation, hpsv2, drawbench, ocr, geneval), a .txt/.json/.jsonl file or a dataset id (repeat "
            "for several). Runs the protocol.")
    parser.add_argument("--reward", default=None,
                        help="Reward (default pickscore): pickscore, hpsv2, hpsv2.1, imagereward, aesthetic, clip, "
                        "ocr, 'geneval:<detector url>', '<name>:<id or path>', 'http://host:port/path', "
                        "'package.module:function' or weights 'pickscore:1,hpsv2.1:0.5'.")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="Denoising steps; default 30 (with --prompt_set: the paper's for the model family).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Defaults to the pipeline's own.")
    parser.add_argument("--resolution", type=_positive_int, default=None,
                        help="Image height and width in pixels; the model's default when not given.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per pipeline call and per reward call.")
    parser.add_argument("--num_frames", type=int, default=None,
                        help="Video pipelines (Wan): frames per video, k*4 + 1. The image reward then scores 4 "
                        "frames spread over each video and averages them.")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid _positive_int value"
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {value}")
    return value


def _sampling_kwargs(args) -> tuple[list[str], dict]:
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
    else:
        prompts = args.prompt
    kwargs = {"num_inference_steps": args.num_inference_steps or 30}
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.resolution is not None:
        kwargs.update(height=args.resolution, width=args.resolution)
    if args.num_frames is not None:
        kwargs["num_frames"] = args.num_frames
    return prompts, kwargs


def _reward(args, spec: str | None = None, resume_hint: str = ""):
    """The reward `spec` (default: --reward), loaded before any pipeline so that a bad name or a missing module fails
    in a second; averaged over frames when the samples are videos (not in the protocol); an exception it raises while
    scoring becomes one message naming it."""
    import functools

    from .rewards import frame_averaged, load_reward

    # `my_rewards:score` from the working directory, as `python -m` would find it (the installed command does not).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    spec = spec or args.reward or DEFAULT_REWARD
    reward = load_reward(spec, **({"device": args.device} if getattr(args, "device", None) else {}))
    if args.num_frames is not None and not getattr(args, "prompt_set", None):
        reward = frame_averaged(reward)

    @functools.wraps(reward)  # keeps its signature: `score_images` calls it TRL's way or ours, as it takes
    def scored(*args, **kwargs):
        try:
            return reward(*args, **kwargs)
        except Exception as exc:  # any failure of the user's reward is the user's to fix: name it
            images = kwargs.get("completions", args[0] if args else ())
            raise ValueError(f"the reward {spec!r} failed on a batch of {len(images)} images ({type(exc).__name__}: "
                             f"{exc}).{resume_hint}") from exc

    scored.__name__ = spec  # the name reports use
    return scored


def build_pairs(argv: list[str]) -> int:
    parser = _sampling_parser(f"{PROG} build-pairs", "Build AI-feedback preference pairs: sample images per "
                              "prompt, score them with a reward, save (prompt, chosen, rejected) with save_to_disk.")
    parser.add_argument("--output_dir", required=True, help="Where the dataset is saved (load it with "
                        "datasets.load_from_disk, or pass it to `train --dataset_name`).")
    parser.add_argument("--num_images_per_prompt", type=int, default=4)
    parser.add_argument("--strategy", default="best_vs_worst", choices=["best_vs_worst", "all_pairs", "random"])
    parser.add_argument("--min_score_gap", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .feedback import build_preference_pairs

    prompts, kwargs = _sampling_kwargs(args)
    pairs = build_preference_pairs(
        args.model, prompts, _reward(args, resume_hint=BUILD_PAIRS_RESUME), num_images_per_prompt=args.num_images_per_prompt,
        strategy=args.strategy,
        min_score_gap=args.min_score_gap, seed=args.seed, batch_size=args.batch_size, output_path=args.output_dir,
        **kwargs,
    )
    print(f"saved {len(pairs)} pairs from {len(prompts)} prompts to {args.output_dir}")
    return 0


def evaluate(argv: list[str]) -> int:
    parser = _sampling_parser(f"{PROG} evaluate", "Win rate of a trained model over its reference, judged by a "
                              "reward on the same prompts and seeds; ties count as half a win. With --prompt_set, the "
                              "full protocol papers report: several rewards on published prompt sets, report.json and "
                              "report.html in --output_dir (resumable).", prompt_sets=True)
    reference = parser.add_mutually_exclusive_group(required=True)
    reference.add_argument("--lora", help="A trained LoRA (folder or hub id): the policy is --model with it loaded, "
                           "the reference is --model with the adapter switched off.")
    reference.add_argument("--reference_model", help="A separate reference pipeline (e.g. after a full fine-tune, "
                           "--model is the fine-tuned pipeline and this the base).")
    reference.add_argument("--denoiser", help="A fine-tuned denoiser folder (unet/transformer) to compare with "
                           "--model's own (protocol only).")
    reference.add_argument("--base_only", action="store_true", help="Score --model alone (protocol only).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="Seeds per prompt; default 0 1 2 3 (0 with --prompt_set).")
    parser.add_argument("--output_file", help="Also write the full result (every comparison) as JSON here.")
    parser.add_argument("--rewards", nargs="+", help="Protocol: the rewards to report, each separately "
                        "(default: --reward if given, else pickscore hpsv2.1 imagereward aesthetic clip).")
    parser.add_argument("--output_dir", help="Protocol: where report.json, report.html, images and scores go.")
    parser.add_argument("--scheduler", help="Protocol: a diffusers scheduler class (default: the pipeline's own).")
    parser.add_argument("--max_prompts", type=int, help="Protocol: the first N prompts of each set.")
    parser.add_argument("--device", help="Protocol: where the pipeline and the rewards run, e.g. cuda.")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="Protocol: the pipeline's precision (rewards stay float32).")
    args = parser.parse_args(argv)
    import json

    if args.prompt_set:
        return _evaluate_protocol(parser, args)
    if args.denoiser or args.base_only:
        parser.error("--denoiser and --base_only need --prompt_set (the protocol).")
    from .evaluation import evaluate_win_rate
    from .families import load_pipeline

    prompts, kwargs = _sampling_kwargs(args)
    reward = _reward(args)
    policy = load_pipeline(args.model)
    if args.lora:
        policy.load_lora_weights(args.lora)
    result = evaluate_win_rate(policy, args.reference_model, prompts, reward,
                               seeds=args.seeds or [0, 1, 2, 3], batch_size=args.batch_size, **kwargs)
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(result, indent=2), encoding="utf-8")
    summary = {k: result[k] for k in ("win_rate", "wins", "losses", "ties", "reward", "reward_reference")}
    print(json.dumps(summary))
    return 0


def _evaluate_protocol(parser, args) -> int:
    if not args.output_dir:
        parser.error("--prompt_set needs --output_dir (where the report and the resumable state go).")
    import json

    from .protocol import evaluate_protocol

    rewards = [_reward(args, spec, PROTOCOL_RESUME)
               for spec in args.rewards or ([args.reward] if args.reward else PROTOCOL_REWARDS)]
    report = evaluate_protocol(
        args.model, args.prompt_set, rewards, args.output_dir, lora=args.lora,
        denoiser=args.denoiser, reference=args.reference_model, seeds=args.seeds or [0], scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
        max_prompts=args.max_prompts, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
    )
    for set_name, rewards in report["results"].items():
        for reward, entry in rewards.items():
            win = entry.get("win_rate", {}).get("value")
            print(json.dumps({"set": set_name, "reward": reward, "base": entry["base"]["mean"],
                              "tuned": entry.get("tuned", {}).get("mean"), "win_rate": win}))
    print(f"report: {Path(args.output_dir) / 'report.html'}")
    return 0


def serve_reward(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} serve-reward", allow_abbrev=False, description="Serve a reward "
                                     "model over HTTP (JSON prompts and base64 PNG images in, scores out), for "
                                     "`--reward http://HOST:PORT/` on another machine.")
    parser.add_argument("--reward", required=True, help="Any name `load_reward` takes, e.g. hpsv2.1 or imagereward.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on; 0.0.0.0 for every one.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="Device of the reward model, e.g. cuda.")
    parser.add_argument("--batch_size", type=int, default=None, help="Images per reward forward pass.")
    parser.add_argument("--max_batch_size", type=int, default=256, help="Refuse requests with more images.")
    parser.add_argument("--max_requests", type=int, default=None, help="Exit after this many requests.")
    args = parser.parse_args(argv)
    from .rewards import load_reward
    from .rewards.http import make_reward_server

    kwargs = {k: v for k, v in (("device", args.device), ("batch_size", args.batch_size)) if v is not None}
    server = make_reward_server(load_reward(args.reward, **kwargs), args.host, args.port, name=args.reward,
                                max_batch_size=args.max_batch_size)
    host, port = server.server_address[:2]
    print(f"serving {args.reward} on http://{host}:{port}/", flush=True)
    try:
        if args.max_requests is None:
            server.serve_forever()
        for _ in range(args.max_requests or 0):
            server.handle_request()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


COMMANDS = {
    "train": ("Fine-tune a pipeline on preference pairs with Diffusion-DPO.", train),
    "build-pairs": ("Build AI-feedback preference pairs by sampling a pipeline and scoring with a reward.",
                    build_pairs),
    "evaluate": ("Win rate of a trained model over its reference, judged by a reward.", evaluate),
    "serve-reward": ("Serve a reward model over HTTP for another machine's training or evaluation.", serve_reward),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Align text-to-image diffusion models to preferences with Diffusion-DPO. "
        f"Run `{PROG} COMMAND --help` for the options of a command.",
        epilog=f"example: {PROG} train --config examples/sd15_lora_pickapic.yaml --max_steps 100",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"Show the full traceback when a command fails (or set {DEBUG_ENV}=1).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    # Only the options before the command and its name are parsed here; the command parses (and documents) the rest.
    name_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    args = parser.parse_args(argv[:name_at + 1])
    try:
        return COMMANDS[args.command][1](argv[name_at + 1:])
    except USER_ERRORS as exc:
        if args.debug or os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        print(f"{PROG} {args.command}: error: {exc}\n(for the traceback: {PROG} --debug {args.command} ..., or "
              f"{DEBUG_ENV}=1)", file=sys.stderr)
        return 2
