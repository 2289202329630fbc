"""The prompt sets papers evaluate text-to-image alignment on, by name, plus any file or dataset of prompts.

| name | source (Hub) | prompts |
|---|---|---|
| `parti` | dataset `nateraw/parti-prompts`, split `train`, column `Prompt` | 1632 (PartiPrompts) |
| `pickapic-test` | dataset `yuvalkirstain/pickapic_v2_no_images`, split `test_unique`, column `caption` | 500 |
| `pickapic-validation` | the same, split `validation_unique` | 500 |
| `hpsv2` | dataset `zhwang/HPDv2`, files `benchmark/{anime,concept-art,paintings,photo}.json` | 4 styles x 800 |
| `drawbench` | dataset `sayakpaul/drawbench`, split `train`, column `Prompts` | 200 |
| `ocr` | shipped: Flow-GRPO's OCR test prompts (`dataset/ocr/test.txt`, MIT), text to render in double quotes | 1018 |
| `geneval` | shipped: GenEval's `prompts/evaluation_metadata.jsonl` (MIT) | 6 tasks, 553 |

`hpsv2` expands to its four styles (`hpsv2/anime`, ...), reported separately as the HPSv2 benchmark does; `geneval`
to its six tasks (`geneval/single_object`, `geneval/two_object`, `geneval/counting`, `geneval/colors`,
`geneval/position`, `geneval/color_attr`), whose mean is the GenEval score (score them with the `geneval` reward,
which finds each prompt's metadata in the same file, over four seeds: the benchmark's four images per prompt). The
shipped files and their licences are in `prompt_data/` (`SOURCES.md`). Besides
names: a `.txt` file (one prompt per line), a `.json` list of strings, a `.jsonl`/`.csv`/`.parquet` file, a
`save_to_disk` directory or a Hub dataset id; an optional `@split` picks a split (`org/prompts@test`). The column is
the first of `prompt`, `Prompt`, `Prompts`, `caption`, `text` that exists.
"""

import json
import os
from pathlib import Path

import datasets

PROMPT_COLUMNS = ("prompt", "Prompt", "Prompts", "caption", "text")
# name -> (Hub dataset id or local stand-in, split, column)
HUB_SETS = {
    "parti": ("nateraw/parti-prompts", "train", "Prompt"),
    "pickapic-test": ("yuvalkirstain/pickapic_v2_no_images", "test_unique", "caption"),
    "pickapic-validation": ("yuvalkirstain/pickapic_v2_no_images", "validation_unique", "caption"),
    "drawbench": ("sayakpaul/drawbench", "train", "Prompts"),
}
HPS_BENCHMARK = "zhwang/HPDv2"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
FILE_BUILDERS = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PROMPT_DATA = Path(__file__).parent / "prompt_data"
OCR_PROMPTS = PROMPT_DATA / "flow_grpo_ocr_test.txt"
GENEVAL_METADATA = PROMPT_DATA / "geneval_evaluation_metadata.jsonl"
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_metadata() -> list[dict]:
    """GenEval's 553 prompts with their metadata (`tag`, `include`, `exclude`, `prompt`), in the official order."""
    return [json.loads(line) for line in GENEVAL_METADATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def _column(data: datasets.Dataset, name: str, column: str | None = None) -> list[str]:
    column = column or next((c for c in PROMPT_COLUMNS if c in data.column_names), None)
    if column is None or column not in data.column_names:
        raise ValueError(f"Prompt set {name!r} has columns {data.column_names}; expected one of {PROMPT_COLUMNS}.")
    prompts = data[column]
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"Prompt set {name!r}, row {row}, column {column!r}: expected a non-empty string, "
                             f"got {prompt!r}.")
    return list(prompts)


def _hps_style(style: str) -> list[str]:
    if os.path.isdir(HPS_BENCHMARK):
        path = os.path.join(HPS_BENCHMARK, "benchmark", f"{style}.json")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(HPS_BENCHMARK, f"benchmark/{style}.json", repo_type="dataset")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _load_source(spec: str) -> list[str]:
    source, _, split = spec.partition("@")
    path = Path(source)
    if path.suffix == ".txt" and path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".json" and path.is_file():
        prompts = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(prompts, list) and all(isinstance(p, str) for p in prompts):
            return prompts
    if path.suffix in FILE_BUILDERS and path.is_file():
        return _column(datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train"), spec)
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            data = data[split or next(iter(data))]
        return _column(data, spec)
    return _column(datasets.load_dataset(source, split=split or "train"), spec)


def load_prompt_sets(specs, max_prompts: int | None = None) -> dict[str, list[str]]:
    """`{set name: prompts}` for names of the table above, files or dataset ids; `max_prompts` keeps the first N."""
    sets: dict[str, list[str]] = {}
    for spec in [specs] if isinstance(specs, str) else specs:
        if spec == "hpsv2":
            sets.update({f"hpsv2/{style}": _hps_style(style) for style in HPS_STYLES})
        elif spec == "geneval":
            rows = geneval_metadata()
            sets.update({f"geneval/{task}": [r["prompt"] for r in rows if r["tag"] == task] for task in GENEVAL_TASKS})
        elif spec == "ocr":
            sets[spec] = _load_source(str(OCR_PROMPTS))
        elif spec in HUB_SETS:
            repo, split, column = HUB_SETS[spec]
            sets[spec] = _column(datasets.load_dataset(repo, split=split), spec, column)
        else:
            sets[spec] = _load_source(spec)
    for name, prompts in sets.items():
        if not prompts:
            raise ValueError(f"Prompt set {name!r} is empty.")
        sets[name] = prompts[:max_prompts] if max_prompts else prompts
    return sets
