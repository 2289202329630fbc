"""Docs and examples cannot drift from the code: the generated reference, example configs, commands, links, notebook."""

import ast
import dataclasses
import graphlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from diffusion_dpo_trainer import DiffusionDPOConfig, cli
from diffusion_dpo_trainer.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIGS = sorted((ROOT / "examples").glob("*.yaml"))
DOCUMENTS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
NOTEBOOK = ROOT / "examples" / "notebook_quickstart.ipynb"

REAL_MODEL_IDS = {"stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0",
                  "stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large",
                  "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-dev",
                  "black-forest-labs/FLUX.2-klein-base-4B", "Qwen/Qwen-Image", "Tongyi-MAI/Z-Image",
                  "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}


def known_config_keys() -> set[str]:
    fields = dataclasses.fields(cli.ScriptArguments) + dataclasses.fields(DiffusionDPOConfig)
    return {f.name for f in fields if f.init} | {"env"}


def test_configuration_reference_matches_the_dataclasses():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = generator.render()
    actual = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/configuration.md is stale: run `python scripts/gen_config_docs.py`"
    own, _ = cli.split_config_fields()
    assert all(f"### `{f.name}`" in actual for f in own)


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_example_config_parses_into_the_cli_dataclasses(path, tmp_path):
    config = yaml.safe_load(path.read_text())
    unknown = set(config) - known_config_keys()
    assert not unknown, f"{path.name}: unknown keys {sorted(unknown)}"
    # use_cpu lets bf16 recipes validate on a machine without a GPU; output_dir keeps the test out of the repo.
    script_args, args = cli.parse_train_args(["--config", str(path), "--use_cpu", "true",
                                              "--output_dir", str(tmp_path / "out")])
    assert script_args.model_name_or_path in REAL_MODEL_IDS
    assert args.output_dir == str(tmp_path / "out")  # the command line overrides the file
    for key, value in config.items():
        if key == "output_dir":
            continue
        parsed = getattr(script_args, key, getattr(args, key, None))
        parsed = getattr(parsed, "value", parsed)  # TrainingArguments turns some strings into enums or lists
        assert parsed in (value, [value]), (key, parsed, value)

    # The effective batch the comment promises for its launch command is what the values give.
    text = path.read_text()
    processes = re.search(r"--num_processes (\d+)", text)
    if processes:
        effective = int(processes.group(1)) * args.per_device_train_batch_size * args.gradient_accumulation_steps
        assert f"{effective} pairs" in text or f"= {effective}" in text, effective


def code_blocks(markdown: str, languages) -> list[str]:
    """The fenced code blocks of a markdown text whose language is one of `languages`."""
    blocks, block, language = [], None, None
    for line in markdown.splitlines():
        if line.startswith("```") and block is None:
            block, language = [], line[3:].strip()
        elif line.startswith("```"):
            if language in languages:
                blocks.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def test_yaml_snippets_in_docs_use_real_keys():
    snippets = [yaml.safe_load(block) for path in DOCUMENTS
                for block in code_blocks(path.read_text(encoding="utf-8"), ("yaml",))]
    assert snippets
    for snippet in snippets:
        assert not set(snippet) - known_config_keys(), sorted(set(snippet) - known_config_keys())


def command_lines(path: Path, command: str = "train"):
    """`diffusion-dpo <command>` commands (any launcher) in a document's code blocks or a YAML file's comments."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        blocks = code_blocks(text, ("bash", "sh", "shell", ""))
    else:
        blocks = ["\n".join(line.lstrip("#") for line in text.splitlines() if line.startswith("#"))]
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if re.search(rf"(diffusion-dpo\)?|diffusion_dpo_trainer) {command}\b", line):
                yield line.strip()


def test_documented_commands_use_real_flags_and_files():
    parser = cli.make_train_parser()
    known = {option for action in parser._actions for option in action.option_strings} | {"--config"}
    checked = 0
    for path in DOCUMENTS + EXAMPLE_CONFIGS:
        for line in command_lines(path):
            tokens = shlex.split(line, comments=True)
            tokens = tokens[tokens.index("train") + 1:]
            for i, token in enumerate(tokens):
                if token.startswith("--"):
                    assert token.split("=")[0] in known, f"{path.name}: {token} in `{line}`"
                if token == "--config" and tokens[i + 1].startswith("examples/"):
                    assert (ROOT / tokens[i + 1]).is_file(), f"{path.name}: {tokens[i + 1]}"
            checked += 1
    assert checked >= 10  # the docs do show commands


class CommandParsed(Exception):
    """Raised in place of running a documented command once its arguments have parsed."""


def test_documented_evaluate_commands_parse(monkeypatch):
    """Every `diffusion-dpo evaluate` command in the docs (bar the `...` sketches) gets past the CLI's argument
    parser: an unknown flag, a bad choice or a missing value exits with status 2 before anything is loaded."""
    def stop(*args, **kwargs):
        raise CommandParsed

    monkeypatch.setattr(cli, "_evaluate_protocol", stop)  # --prompt_set: the protocol
    monkeypatch.setattr(cli, "_sampling_kwargs", stop)  # otherwise: the win rate (it reads --prompts_file)
    checked = 0
    for path in DOCUMENTS:
        for line in command_lines(path, "evaluate"):
            if "..." in line:
                continue
            tokens = shlex.split(line, comments=True)
            with pytest.raises(CommandParsed):
                cli.evaluate(tokens[tokens.index("evaluate") + 1:])
            checked += 1
    assert checked >= 5  # evaluation.md and cli.md show commands


def test_relative_links_in_docs_resolve():
    broken = []
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists():
                broken.append(f"{path.name} -> {target}")
    assert not broken


def test_notebook_is_valid_and_its_config_uses_real_fields():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4 and isinstance(notebook["metadata"], dict)
    kinds = {cell["cell_type"] for cell in notebook["cells"]}
    assert kinds == {"markdown", "code"}
    source = ""
    for cell in notebook["cells"]:
        assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
            code = "".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!")))
            ast.parse(code)
            source += code + "\n"
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "DiffusionDPOConfig"]
    (config_call,) = calls
    fields = {f.name for f in dataclasses.fields(DiffusionDPOConfig)}
    assert {k.arg for k in config_call.keywords} <= fields
    for needle in ("load_lora_weights", "push_to_hub", "make_image_grid", "DiffusionDPOTrainer("):
        assert needle in source, needle


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table under `## heading`, keyed by their first cell without backticks."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip().strip("`"): [c.strip() for c in cells[1:]] for cells in rows}


def test_every_registered_pipeline_class_is_documented_in_models_md():
    """docs/models.md has a row per registered pipeline class in both tables, with a recipe that exists, and README's
    first screen links it and names every family of the table."""
    registered = {name for family in FAMILIES for name in family.pipeline_class_names}
    models = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    trained, memory = table_rows(models, "What is trained"), table_rows(models, "Memory at 1024 px")
    assert set(trained) == registered, f"docs/models.md 'What is trained' rows vs the registry: {set(trained) ^ registered}"
    assert set(memory) == registered, f"docs/models.md 'Memory at 1024 px' rows vs the registry: {set(memory) ^ registered}"
    for family in FAMILIES:
        for name in family.pipeline_class_names:
            assert f"{family.default_beta:g}" in trained[name][3], (name, "default beta")
            recipes = re.findall(r"\]\(\.\./(examples/[^)]+)\)", trained[name][-1])
            assert recipes and all((ROOT / r).is_file() for r in recipes), (name, trained[name][-1])
    first_screen = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:12])
    assert "(docs/models.md)" in first_screen
    missing = [row[0] for row in trained.values() if row[0] not in first_screen]
    assert not missing, f"README's first screen does not name {missing}"


def test_modules_import_one_way():
    """No module of the package imports (even inside a function) one that imports it back: the layers of
    docs/architecture.md. `from .x import y` is an edge to the module `x.y` if there is one, else to `x`."""
    imports = {}
    for path in (ROOT / "diffusion_dpo_trainer").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        here = parts[:-1]  # the package a relative import starts from
        names = imports.setdefault(".".join(here if parts[-1] == "__init__" else parts), set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ((node.module,) if node.module else ()))
                names.update((base, alias.name) for alias in node.names)
    graph = {module: {f"{base}.{name}" if f"{base}.{name}" in imports else base for base, name in names} - {module}
             for module, names in imports.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the modules of a cycle
