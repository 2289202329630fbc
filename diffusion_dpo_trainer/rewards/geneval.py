"""GenEval (Ghosh et al., arXiv 2310.11513) as a reward and a benchmark: the official scoring rules, here, on the
detections of the official detector, which runs as an HTTP server in its own environment (mmdet 2.x and a compiled
mmcv cannot be installed beside this library; `examples/geneval_server.py` is that server, docs/rewards.md its recipe).

The rules, from `evaluation/evaluate_images.py` of djghosh13/geneval (its defaults are ours):

- detections of a class are kept when their confidence exceeds 0.3, or 0.9 for a `counting` prompt; the 16 most
  confident per class at most, most confident first; overlapping boxes are all kept (`max_overlap` 1.0: the official
  non-maximum suppression is off by default; below 1, a box whose IoU with a kept one reaches it is dropped);
- an `include` clause `{class, count}` holds when at least `count` objects of the class are kept; with `color`, when
  at least `count` of the `count` most confident are of that colour; with `position: [relation, i]`, when each of
  them stands in `relation` ("left of", "right of", "above", "below") to each object of clause i, after the two
  boxes' centres are moved towards each other by 0.1 x the sum of their sizes (per axis) and the direction of what
  is left is within 60 degrees of the relation's axis;
- an `exclude` clause `{class, count}` fails when `count` or more objects of the class are kept;
- an image is correct (strict score 1.0) when every clause holds; the benchmark's score per task is the share of
  correct images, and the GenEval score the mean over its six tasks (`evaluation/summary_scores.py`: `summarize`).

Colour: the official classifies each object's crop (its mask on grey, cropped to its box) with CLIP ViT-L/14 among
ten colours; here the detector server does that and returns the colour with the box.

The partial score is the one Flow-GRPO trains on (yifan123/reward-server, `evaluate_reward`): per include clause,
`1 - |count - found| / count` for the number of objects (exact counts: an extra object costs as a missing one), then,
when the count is exact, `1 - |count - of that colour| / count` for a colour, and 1 or 0 for a position (when the
clause's colour holds; a wrong count with a colour or position adds one 0 instead); the score is the mean of these
terms; exclude clauses are not used. It can fall below 0 when far more objects are found than asked for. (Flow-GRPO
appends a 1 after a failed position check as well as the 0; here a failed position counts 0 only.)

The detector protocol, one JSON request per batch:

    POST <url>   {"images": ["<base64 PNG>", ...], "prompts": [...], "metadata": [{"tag", "include", ...}, ...]}
    200          {"detections": [{"<class>": [{"box": [x1, y1, x2, y2], "score": 0.97, "color": "red"}, ...]}, ...]}

one dict per image, in order: every detection with a confidence above 0.3 of the 80 COCO classes it found (pixels,
box corners inclusive), and a `color` (one of `COLORS`) on every box of a class that an include clause of the image's
metadata gives a colour.
"""

import json
import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .base import check_inputs
from .http import RewardServerError, encode_image, post_json

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
SERVER_HINT = "Start the GenEval detector server: see examples/geneval_server.py and docs/rewards.md."


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    color: str | None = None


@dataclass(frozen=True)
class GenEvalResult:
    correct: bool  # every clause holds: the benchmark's verdict (strict score 1.0 or 0.0)
    partial: float  # Flow-GRPO's partial score
    reason: str  # the failed clauses, as the official `reason`


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with the official's inclusive pixel corners (a box from x1 to x2 is x2 - x1 + 1 wide)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select(detections: dict[str, list[Detection]], tag: str, threshold: float = 0.3, counting_threshold: float = 0.9,
           max_objects: int = 16, max_overlap: float = 1.0) -> dict[str, list[Detection]]:
    """The objects the rules see, per class: above the tag's threshold, most confident first, at most `max_objects`,
    greedy suppression of boxes whose IoU with a kept one reaches `max_overlap` (none at 1.0)."""
    cutoff = counting_threshold if tag == "counting" else threshold
    kept = {}
    for name, found in detections.items():
        order = sorted((d for d in found if d.score > cutoff), key=lambda d: -d.score)[:max_objects]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if max_overlap != 1:
                order = [d for d in order if box_iou(best.box, d.box) < max_overlap]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """Where `a` is relative to `b`: the centre offset shrunk by `position_threshold` x the boxes' summed sizes per
    axis, then each relation whose axis the remaining direction is within 60 degrees of (|cos| > 0.5)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


def _colors(objects: list[Detection], name: str) -> list[str]:
    colors = [d.color for d in objects]
    if None in colors:
        raise RewardServerError(f"The GenEval detector returned a {name!r} box without a 'color'; the metadata asks "
                                f"for that class's colour, so the server must classify it (one of {COLORS}).")
    return colors


def _position_holds(objects, targets, relation, position_threshold) -> bool:
    return all(relation in relative_position(obj, target, position_threshold) for obj in objects for target in targets)


def evaluate(detected: dict[str, list[Detection]], metadata: dict, position_threshold: float = 0.1) -> GenEvalResult:
    """Both scores of one image from its selected detections (`select`) and its GenEval metadata."""
    correct, reasons, groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detected.get(name, [])[:count]
        holds = len(found) >= count
        if not holds:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        elif "color" in clause:
            colors = _colors(found, name)
            if colors.count(clause["color"]) < count:
                holds = False
                reasons.append(f"expected {clause['color']} {name}>={count}, found {colors.count(clause['color'])} "
                               f"{clause['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in COLORS
                                                                   if c in colors))
        if holds and "position" in clause:
            relation, target = clause["position"]
            if groups[target] is None:
                holds = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not _position_holds(found, groups[target], relation, position_threshold):
                holds = False
                reasons.append(f"expected {name} {relation} target")
        correct &= holds
        groups.append(found if holds else None)
    for clause in metadata.get("exclude", []):
        found = len(detected.get(clause["class"], []))
        if found >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {found}")
    return GenEvalResult(correct, _partial(detected, metadata, position_threshold), "\n".join(reasons))


def _partial(detected: dict[str, list[Detection]], metadata: dict, position_threshold: float) -> float:
    terms, groups = [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detected.get(name, [])
        terms.append(1 - abs(count - len(found)) / count)
        holds = len(found) == count
        if not holds:
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                matching = _colors(found, name).count(clause["color"])
                terms.append(1 - abs(count - matching) / count)
                holds = matching == count
            if "position" in clause and holds:
                relation, target = clause["position"]
                holds = groups[target] is not None and _position_holds(found, groups[target], relation,
                                                                       position_threshold)
                terms.append(1.0 if holds else 0.0)
        groups.append(found if holds else None)
    return sum(terms) / len(terms) if terms else 0.0


def summarize(results: Iterable[dict]) -> dict:
    """`evaluation/summary_scores.py` on rows `{"tag", "prompt", "correct"}` (one per image): the share of correct
    images and of prompts with at least one correct image, the share per task, and the GenEval score (their mean)."""
    rows = list(results)
    if not rows:
        raise ValueError("No GenEval results to summarize.")
    by_task, by_prompt = defaultdict(list), defaultdict(list)
    for row in rows:
        by_task[row["tag"]].append(bool(row["correct"]))
        by_prompt[row["prompt"]].append(bool(row["correct"]))
    tasks = {tag: float(np.mean(values)) for tag, values in by_task.items()}
    return {"images": len(rows), "prompts": len(by_prompt),
            "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
            "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])), "tasks": tasks,
            "overall": float(np.mean(list(tasks.values())))}


def _clauses(clauses):
    """A dataset's struct columns fill absent keys with None (a clause without `color` gets `color: None`)."""
    if not isinstance(clauses, list):
        return clauses
    return [{k: v for k, v in c.items() if v is not None} if isinstance(c, dict) else c for c in clauses]


def _check_metadata(metadata, row: int) -> dict:
    where = f"metadata of prompts[{row}]"
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc}).") from exc
    if isinstance(metadata, dict):
        metadata = {**metadata, "include": _clauses(metadata.get("include")),
                    "exclude": _clauses(metadata.get("exclude"))}
    if not isinstance(metadata, dict) or not isinstance(metadata.get("include"), list) or not metadata["include"]:
        raise ValueError(f"{where}: expected a dict with a non-empty 'include' list (GenEval's metadata), got "
                         f"{metadata!r}.")
    for key in ("include", "exclude"):
        for i, clause in enumerate(metadata.get(key) or []):
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) or \
                    not isinstance(clause.get("count"), numbers.Integral) or clause["count"] < 1:
                raise ValueError(f"{where}, {key}[{i}]: expected {{'class': str, 'count': int >= 1, ...}}, got "
                                 f"{clause!r}.")
            if "color" in clause and clause["color"] not in COLORS:
                raise ValueError(f"{where}, {key}[{i}]: color {clause['color']!r} is not one of {COLORS}.")
            if "position" in clause:
                position = clause["position"]
                if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                        or not isinstance(position[1], numbers.Integral) or not 0 <= position[1] < i):
                    raise ValueError(f"{where}, {key}[{i}]: position must be [one of {RELATIONS}, the index of an "
                                     f"earlier include clause], got {position!r}.")
    return {"tag": metadata.get("tag", ""), "include": metadata["include"], "exclude": metadata.get("exclude") or []}


def _parse_detections(answer, count: int, url: str) -> list[dict[str, list[Detection]]]:
    detections = answer.get("detections") if isinstance(answer, dict) else None
    if not isinstance(detections, list) or len(detections) != count:
        raise RewardServerError(f"GenEval server {url} answered {str(answer)[:200]!r}; expected "
                                f"{{'detections': [...]}} with one dict per image for {count} images.")
    parsed = []
    for i, image in enumerate(detections):
        if not isinstance(image, dict):
            raise RewardServerError(f"GenEval server {url}, detections[{i}]: expected {{class: [boxes]}}, "
                                    f"got {image!r}.")
        per_class = {}
        for name, boxes in image.items():
            try:
                per_class[name] = [Detection(tuple(float(v) for v in b["box"]), float(b["score"]), b.get("color"))
                                   for b in boxes]
            except (TypeError, KeyError, ValueError) as exc:
                raise RewardServerError(f"GenEval server {url}, detections[{i}][{name!r}]: expected a list of "
                                        f"{{'box': [x1, y1, x2, y2], 'score': float, 'color'?: str}} ({exc}).") from exc
            bad = next((d for d in per_class[name] if len(d.box) != 4 or not math.isfinite(d.score)
                        or (d.color is not None and d.color not in COLORS)), None)
            if bad is not None:
                raise RewardServerError(f"GenEval server {url}, detections[{i}][{name!r}]: bad detection {bad}; "
                                        f"expected 4 box corners, a finite score and a colour in {COLORS}.")
        parsed.append(per_class)
    return parsed


class GenEvalReward:
    """`load_reward("geneval:http://host:port/detect")` (strict: 1.0 when every rule holds) or `"geneval-partial:..."`
    (Flow-GRPO's partial score): GenEval's rules on the detections of a detector server.

    Each image's metadata (`tag`, `include`, `exclude`) comes, in this order, from a `metadata` column (dicts or JSON
    strings), from `tag` / `include` / `exclude` columns (TRL's convention: dataset columns arrive as keyword
    arguments, one value per image), or from the official prompt list when the prompt is one of GenEval's 553 (so
    `evaluate` on the `geneval` prompt set needs no columns).

    Args:
        url: the detector server's endpoint.
        score: "strict" or "partial".
        threshold, counting_threshold, max_objects, max_overlap, position_threshold: the official options
            (`--options threshold=... counting_threshold=... max_objects=... max_overlap=... position_threshold=...`).
        timeout, batch_size: seconds to wait per request, images per request.
        device, dtype: accepted and ignored (the server runs the detector).
    """

    def __init__(self, url: str | None = None, score: str = "strict", threshold: float = 0.3,
                 counting_threshold: float = 0.9, max_objects: int = 16, max_overlap: float = 1.0,
                 position_threshold: float = 0.1, timeout: float = 300.0, batch_size: int = 16, device=None,
                 dtype=None):
        if not url:
            raise ValueError("The GenEval reward needs its detector server's URL: load_reward('geneval:http://host:"
                             "port/detect') or load_reward('geneval', url=...). " + SERVER_HINT)
        if score not in ("strict", "partial"):
            raise ValueError(f"score must be 'strict' or 'partial', got {score!r}.")
        self.url, self.score, self.timeout, self.batch_size = url, score, timeout, batch_size
        self.selection = {"threshold": threshold, "counting_threshold": counting_threshold,
                          "max_objects": max_objects, "max_overlap": max_overlap}
        self.position_threshold = position_threshold
        self._official = None

    def metadata_for(self, prompts: list[str], metadata=None, tag=None, include=None, exclude=None) -> list[dict]:
        """Each prompt's GenEval metadata, from the columns given or the official prompt list."""
        if metadata is not None:
            return [_check_metadata(m, row) for row, m in enumerate(metadata)]
        if include is not None:
            return [_check_metadata({"tag": tag[row] if tag is not None else "",
                                     "include": include[row], "exclude": exclude[row] if exclude is not None else []},
                                    row) for row in range(len(prompts))]
        if self._official is None:
            from ..prompt_sets import geneval_metadata

            self._official = {row["prompt"]: row for row in geneval_metadata()}
        missing = next((row for row, p in enumerate(prompts) if p not in self._official), None)
        if missing is not None:
            raise ValueError(f"prompts[{missing}] {prompts[missing]!r} is not one of GenEval's prompts; give its "
                             "metadata as dataset columns `tag`, `include` and `exclude` (or `metadata`), as in "
                             "GenEval's evaluation_metadata.jsonl.")
        return [_check_metadata(self._official[p], row) for row, p in enumerate(prompts)]

    def detect(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> list[dict]:
        """The server's detections per image, in batches of `batch_size`."""
        detections = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            payload = {"images": [encode_image(im.convert("RGB")) for im in images[start:stop]],
                       "prompts": list(prompts[start:stop]), "metadata": metadata[start:stop]}
            answer = post_json(self.url, payload, self.timeout, SERVER_HINT)
            detections += _parse_detections(answer, len(payload["images"]), self.url)
        return detections

    def evaluate(self, images: list[Image.Image], prompts: list[str], **columns) -> list[GenEvalResult]:
        """One `GenEvalResult` per image (both scores and the reason)."""
        check_inputs(images, prompts)
        for key in ("metadata", "tag", "include", "exclude"):
            if columns.get(key) is not None and len(columns[key]) != len(images):
                raise ValueError(f"Column {key!r} has {len(columns[key])} values for {len(images)} images; "
                                 "expected one per image.")
        metadata = self.metadata_for(list(prompts), **{k: columns.get(k) for k in ("metadata", "tag", "include",
                                                                                    "exclude")})
        return [evaluate(select(found, meta["tag"], **self.selection), meta, self.position_threshold)
                for found, meta in zip(self.detect(list(images), list(prompts), metadata), metadata)]

    def __call__(self, images: list[Image.Image] | None = None, prompts: list[str] | None = None,
                 completions: list[Image.Image] | None = None, **columns) -> list[float]:
        """`reward(images, prompts, **columns)`, or TRL's `reward(prompts=..., completions=images, **columns)` (the
        `completions` keyword is what makes the online trainers pass the dataset's columns)."""
        images = completions if images is None else images
        if images is None or prompts is None:
            raise TypeError("The GenEval reward needs the images (or `completions`) and their `prompts`.")
        results = self.evaluate(images, prompts, **columns)
        return [float(r.correct) if self.score == "strict" else r.partial for r in results]
