"""Dataset formats -> canonical rows: the one place that knows what users' datasets look like.

A canonical pair is a row with `prompt` (str), `chosen` and `rejected` (an image as PIL, `datasets.Image` value,
encoded bytes or a file path) and `row_index` (the row in the user's dataset, named by every later error). Pick-a-Pic
rows and image folders with a `metadata.jsonl` are normalised to that form without copying or decoding images, so
datasets of any size stay memory-mapped; images are decoded in the collator, so a bad image is reported with its row
and column. Unpaired rows (KTO) are `prompt`, `image`, `label`.
"""

import itertools
import json
import logging
import os

import datasets
import numpy as np

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
IMAGE_COLUMNS = ("chosen", "rejected")
ROW_COLUMN = "row_index"
#: A pair's soft preference label: the probability in [0, 1] that `chosen` is preferred (see `with_soft_labels`).
LABEL_COLUMN = "soft_label"
SCORE_COLUMNS = ("chosen_score", "rejected_score")
#: Pick-a-Pic v1/v2: `label_0` is 1 when `jpg_0` is preferred, 0 when `jpg_1` is, 0.5 for a tie.
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
FOLDER_METADATA = "metadata.jsonl"
FOLDER_KEYS = ("prompt", "chosen_file_name", "rejected_file_name")

logger = logging.getLogger(__name__)


def prepare_preference_dataset(dataset, name: str = "train_dataset", soft_labels: bool = False,
                               keep_ties: bool = False):
    """Normalise any supported format to canonical pairs and make them ready for the collator (lazy decoding); with
    `soft_labels`, each pair also gets its `soft_label` (see `with_soft_labels`), and Pick-a-Pic ties are kept with
    label 0.5 when `keep_ties`."""
    if not soft_labels:
        return _undecoded(to_preference_pairs(dataset, name), IMAGE_COLUMNS)
    return _undecoded(with_soft_labels(dataset, name, keep_ties), IMAGE_COLUMNS)


def with_soft_labels(dataset, name: str = "dataset", keep_ties: bool = False) -> datasets.Dataset:
    """Canonical pairs plus `soft_label`, the probability p that `chosen` is preferred, from (first found): a
    `soft_label` column; `chosen_score`/`rejected_score`, mapped as SmPO (arXiv 2506.02698) maps reward scores,
    p = sigmoid((s_w - s_l) / (max - min over all scores)); Pick-a-Pic's `label_0` (1, or 0.5 for a tie kept with
    `keep_ties`)."""
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_preference_folder(dataset)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`{name}`: soft labels and curricula need a map-style datasets.Dataset (every pair's label "
                        f"is read before training), got {type(dataset).__name__}.")
    columns = dataset.column_names
    if _format_of(dataset, name) == "pickapic":
        pairs = _pickapic_to_pairs(_with_row_index(dataset), name, keep_ties)
        ties = np.zeros(len(pairs), dtype=bool)
        if keep_ties:
            ties = np.array(_columns(pairs, "label_0")[0]) == 0.5
            pairs = pairs.remove_columns("label_0")
        return pairs.add_column(LABEL_COLUMN, np.where(ties, 0.5, 1.0))
    pairs = to_preference_pairs(dataset, name)  # the rows of `dataset`, in its order
    rows = _columns(pairs, ROW_COLUMN)[0]
    if LABEL_COLUMN in columns:
        values = _columns(dataset, LABEL_COLUMN)[0]
        for row, value in zip(rows, values):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"Row {row}, column {LABEL_COLUMN!r}: expected the probability in [0, 1] that "
                                 f"'chosen' is preferred, got {value!r}.")
        values = np.asarray(values, dtype=np.float64)
    elif all(c in columns for c in SCORE_COLUMNS):
        chosen, rejected = (np.asarray(v, dtype=np.float64) for v in _columns(dataset, *SCORE_COLUMNS))
        for column, scores in zip(SCORE_COLUMNS, (chosen, rejected)):
            bad = np.flatnonzero(~np.isfinite(scores))
            if len(bad):
                raise ValueError(f"Row {rows[bad[0]]}, column {column!r}: expected a finite score, got "
                                 f"{scores[bad[0]]}.")
        both = np.concatenate([chosen, rejected])
        spread = float(both.max() - both.min()) or 1.0
        values = 1.0 / (1.0 + np.exp(-(chosen - rejected) / spread))
    else:
        raise ValueError(f"`{name}` has no soft-label source: expected a {LABEL_COLUMN!r} column (the probability "
                         f"that 'chosen' is preferred) or {list(SCORE_COLUMNS)} columns, found {columns}.")
    return pairs.add_column(LABEL_COLUMN, values)


def _undecoded(dataset, columns):
    """Image and video columns cast to `decode=False`: the collator decodes them (and names a bad row); a
    `datasets.Video` column is then read with PyAV, without torchcodec."""
    for column in columns:
        feature = dataset.features.get(column) if dataset.features is not None else None
        if isinstance(feature, (datasets.Image, datasets.Video)):
            dataset = dataset.cast_column(column, type(feature)(decode=False))
    return dataset


def to_preference_pairs(dataset, name: str = "dataset") -> datasets.Dataset:
    """Canonical pairs (`prompt`, `chosen`, `rejected`, and `row_index`: the row in `dataset`) from any format.

    Detected from the columns: `prompt`/`chosen`/`rejected` (TRL style; images as PIL, `datasets.Image`, bytes or file
    paths), `caption`/`jpg_0`/`jpg_1`/`label_0` (Pick-a-Pic v1/v2; ties dropped and counted), or a path to a folder
    with a `metadata.jsonl` (see `load_preference_folder`). Other columns are dropped. Rows are selected and renamed,
    never rewritten, so nothing is decoded or copied. A streamed `datasets.IterableDataset` is normalised row by row
    as it streams (see `_streamed_pairs`).
    """
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_preference_folder(dataset)
    if isinstance(dataset, datasets.IterableDataset):
        return _streamed_pairs(dataset, name)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"`{name}` must be a datasets.Dataset, a datasets.IterableDataset or a path to a folder with a "
            f"{FOLDER_METADATA}, got {type(dataset).__name__}."
        )
    if _format_of(dataset, name) == "trl":
        pairs = _with_row_index(dataset).select_columns([*PAIR_COLUMNS, ROW_COLUMN])
    else:
        pairs = _pickapic_to_pairs(_with_row_index(dataset), name)
    if len(pairs) == 0:
        raise ValueError(f"`{name}` is empty: there are no preference pairs to train on.")
    for row, prompt in zip(*_columns(pairs, ROW_COLUMN, "prompt")):
        _check_text(prompt, row, "prompt")
    return pairs


def _streamed_pairs(dataset: datasets.IterableDataset, name: str) -> datasets.IterableDataset:
    """Canonical pairs from a streamed dataset, built lazily: nothing is read before training.

    Each row is checked when it is reached, and a bad one raises the same error as for a map-style dataset; `row_index`
    counts rows as they stream (per DataLoader worker when there are several). Checks over the whole dataset cannot
    be made: an empty stream is reported by the Trainer, and Pick-a-Pic ties are dropped without being counted.
    """
    columns = dataset.column_names
    if columns is None:
        raise ValueError(f"`{name}` is a streamed dataset whose columns are unknown; load it with its features.")

    def trl_pair(row, index):
        _check_text(row["prompt"], index, "prompt")
        return {ROW_COLUMN: index}

    def pickapic_pair(row, index):
        _check_pickapic_row(index, row["label_0"], row["caption"])
        first, second = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1 else (row["jpg_1"], row["jpg_0"])
        return {"prompt": row["caption"], "chosen": first, "rejected": second, ROW_COLUMN: index,
                "tie": row["label_0"] == 0.5}

    if _format_of(dataset, name) == "trl":
        pairs = _undecoded(dataset, IMAGE_COLUMNS).map(trl_pair, with_indices=True)
        return pairs.select_columns([*PAIR_COLUMNS, ROW_COLUMN])
    pairs = _undecoded(dataset, ("jpg_0", "jpg_1")).map(pickapic_pair, with_indices=True, remove_columns=columns)
    return pairs.filter(lambda row: not row["tie"]).remove_columns("tie")


def check_one_step_fits(dataset, batch_size: int, accumulation: int, processes: int, drop_last: bool,
                        name: str = "train_dataset") -> None:
    """Refuse a dataset that can never complete one optimizer step, naming the numbers that conflict.

    The Trainer does not: a stream shorter than one step (`batch_size` x `accumulation` x `processes` rows) passes over
    its rows again and again without ever stepping (a silent hang), and with `drop_last` a dataset smaller than one
    batch per process yields no batch at all (the run "finishes" untrained). A stream is checked by reading at most
    one step's rows, undecoded.
    """
    per_step = batch_size * accumulation * processes
    numbers = (f"per_device_train_batch_size {batch_size} x gradient_accumulation_steps {accumulation} x "
               f"{processes} process(es)")
    if isinstance(dataset, datasets.IterableDataset):
        rows = sum(1 for _ in itertools.islice(dataset, per_step))
        if rows == 0:
            raise ValueError(f"`{name}` is an empty stream: there are no rows to train on.")
        if rows < per_step:
            raise ValueError(
                f"`{name}` is a stream of {rows} rows, fewer than one optimizer step takes ({numbers} = {per_step}): "
                "training would never complete a step. Lower per_device_train_batch_size or "
                "gradient_accumulation_steps, or add rows."
            )
    elif drop_last and len(dataset) < batch_size * processes:
        raise ValueError(
            f"`{name}` has {len(dataset)} rows, fewer than one batch (per_device_train_batch_size {batch_size} x "
            f"{processes} process(es)), and dataloader_drop_last drops that partial batch: nothing would be trained. "
            "Lower per_device_train_batch_size, turn dataloader_drop_last off, or add rows."
        )


def _format_of(dataset, name: str) -> str:
    """'trl' or 'pickapic', detected from the columns; the missing columns of the detected format are named."""
    columns = dataset.column_names
    if any(c in columns for c in PAIR_COLUMNS):
        _require_columns(dataset, PAIR_COLUMNS, "prompt/chosen/rejected", name)
        return "trl"
    if any(c in columns for c in PICKAPIC_COLUMNS):
        _require_columns(dataset, PICKAPIC_COLUMNS, "Pick-a-Pic", name)
        return "pickapic"
    raise ValueError(
        f"`{name}` has columns {columns}, which match no supported format: expected {list(PAIR_COLUMNS)} "
        f"(TRL style), {list(PICKAPIC_COLUMNS)} (Pick-a-Pic), or a folder with a {FOLDER_METADATA}."
    )


def _check_text(value, row: int, column: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"Row {row}, column {column!r}: expected a string, got {type(value).__name__}.")


def _check_pickapic_row(row: int, label, caption) -> None:
    _check_text(caption, row, "caption")
    if not (isinstance(label, (int, float)) and label in (0, 0.5, 1)):
        raise ValueError(
            f"Row {row}, column 'label_0': expected 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (a tie), "
            f"got {label!r}."
        )


def load_preference_folder(path, **load_dataset_kwargs) -> datasets.Dataset:
    """Pairs from a folder of images and a `metadata.jsonl`, loaded with the `datasets` imagefolder builder.

    Each line of `metadata.jsonl` is `{"prompt": ..., "chosen_file_name": ..., "rejected_file_name": ...}` with file
    names relative to the folder: the imagefolder convention, so `load_dataset("imagefolder", data_dir=path)` and the
    Hub read the same folder. Extra keyword arguments go to `datasets.load_dataset` (e.g. `cache_dir`).
    """
    metadata = os.path.join(path, FOLDER_METADATA)
    if not os.path.isfile(metadata):
        raise ValueError(f"{str(path)!r} is not a preference folder: {metadata} does not exist.")
    with open(metadata, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    keys = set(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{metadata} line {line_number}: not valid JSON ({exc}).") from exc
                if not set(FOLDER_KEYS) <= keys:
                    raise ValueError(
                        f"{metadata} line {line_number}: expected keys {list(FOLDER_KEYS)} (file names relative to "
                        f"the folder), found {sorted(keys)}."
                    )
                break
        else:
            raise ValueError(f"{metadata} is empty: there are no preference pairs to train on.")
    return datasets.load_dataset("imagefolder", data_dir=str(path), split="train", **load_dataset_kwargs)


def _require_columns(dataset: datasets.Dataset, required, format_name: str, name: str) -> None:
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`{name}` is missing column(s) {missing} of the {format_name} format; expected {list(required)}, "
            f"found {dataset.column_names}."
        )


def _columns(dataset: datasets.Dataset, *names: str) -> list[list]:
    """Whole columns as Python lists in one read (iterating `dataset[name]` reads row by row)."""
    values = dataset.select_columns(list(names)).with_format(None)[:]
    return [values[name] for name in names]


def _with_row_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """Number the rows once, so every later error names the row of the dataset the user passed."""
    if ROW_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(ROW_COLUMN, np.arange(len(dataset)))


def _pickapic_to_pairs(dataset: datasets.Dataset, name: str, keep_ties: bool = False) -> datasets.Dataset:
    """Winner/loser by `label_0`, ties dropped; done with select + rename so the image bytes are never copied.
    With `keep_ties`, ties stay (jpg_0 as `chosen`) and `label_0` is kept for the caller to label them."""
    first_wins, second_wins, ties = [], [], 0
    for position, (row, label, caption) in enumerate(zip(*_columns(dataset, ROW_COLUMN, "label_0", "caption"))):
        _check_pickapic_row(row, label, caption)
        if label == 0.5 and not keep_ties:
            ties += 1
        else:
            (first_wins if label != 0 else second_wins).append(position)
    if ties:
        logger.warning(
            f"`{name}`: dropped {ties} of {len(dataset)} Pick-a-Pic rows that are ties (label_0 == 0.5); "
            f"{len(dataset) - ties} pairs remain."
        )
        if ties == len(dataset):
            raise ValueError(
                f"`{name}` is empty after dropping its {ties} Pick-a-Pic ties (label_0 == 0.5): there are no "
                "preference pairs to train on."
            )
    columns = [*PAIR_COLUMNS, ROW_COLUMN, *(["label_0"] if keep_ties else [])]
    views = [
        dataset.select(positions)
        .rename_columns({"caption": "prompt", winner: "chosen", loser: "rejected"})
        .select_columns(columns)
        for positions, winner, loser in ((first_wins, "jpg_0", "jpg_1"), (second_wins, "jpg_1", "jpg_0"))
    ]
    pairs = datasets.concatenate_datasets(views)
    # Back to the original row order (an index mapping, not a copy).
    return pairs.select(np.argsort(np.array(first_wins + second_wins), kind="stable"))


UNPAIRED_COLUMNS = ("prompt", "image", "label")


def prepare_unpaired_dataset(dataset: datasets.Dataset, name: str = "train_dataset",
                             column: str = "image") -> datasets.Dataset:
    """Validate an unpaired dataset (prompt, image, label: True = desirable) and make it ready for its collator.

    Labels must be real booleans: a 0/1 or a score column would silently mean something else, so it is rejected.
    `column` names the media column (`video` for video models).
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`{name}` must be a datasets.Dataset, got {type(dataset).__name__}.")
    _require_columns(dataset, ("prompt", column, "label"), f"unpaired (kto: label True for a desirable {column}, "
                     f"False for an undesirable one)", name)
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: there are no labelled images to train on.")
    dataset = _with_row_index(dataset)
    for row, prompt, label in zip(*_columns(dataset, ROW_COLUMN, "prompt", "label")):
        _check_text(prompt, row, "prompt")
        if not isinstance(label, (bool, np.bool_)):
            raise ValueError(
                f"Row {row}, column 'label': expected a bool (True = desirable, False = undesirable), "
                f"got {label!r} of type {type(label).__name__}."
            )
    return _undecoded(dataset, (column,))


def map_eval_datasets(eval_dataset, function):
    """Apply `function(dataset, name)` to `eval_dataset`, which may be one dataset, a dict of them, or None."""
    if isinstance(eval_dataset, dict):
        return {key: function(value, f"eval_dataset[{key!r}]") for key, value in eval_dataset.items()}
    return None if eval_dataset is None else function(eval_dataset, "eval_dataset")


def eval_datasets(eval_dataset) -> list:
    """The evaluation datasets as a list (empty for None)."""
    if isinstance(eval_dataset, dict):
        return list(eval_dataset.values())
    return [] if eval_dataset is None else [eval_dataset]
