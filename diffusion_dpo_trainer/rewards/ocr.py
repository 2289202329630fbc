"""Flow-GRPO's OCR reward: how much of the prompt's quoted text an OCR model reads in the image.

The rules follow `flow_grpo/ocr.py` (yifan123/flow_grpo):

- the target is the text between the prompt's first two double quotes (`prompt.split('"')[1]`): `A sign that reads
  "Open 24 Hours"` -> `Open 24 Hours`; a prompt without a quote, or with an empty quote, is an error here (Flow-GRPO
  fails on the first and divides by zero on the second);
- the read text is every box the OCR model keeps, joined without a separator in the model's reading order (top to
  bottom, left to right); a box is kept when its recognition confidence is at least `text_score` (0.5: PaddleOCR's
  `drop_score`, which Flow-GRPO leaves at its default);
- both are lower-cased with the spaces removed; the distance d is 0 when the target appears in the read text, else
  their Levenshtein distance, capped at the target's length (unrelated extra text costs at most everything);
- the score is `1 - d / len(target)`: 1.0 for the exact text, 0.0 when nothing is read.

The OCR model is PaddleOCR's PP-OCRv4 detection and recognition as ONNX, shipped inside the `rapidocr-onnxruntime`
wheel and run by onnxruntime: no download, CPU by default, no angle classifier (Flow-GRPO sets `use_angle_cls=False`),
detection with PaddleOCR's settings (`PADDLEOCR_DETECTION`).
Two differences from Flow-GRPO, which runs `paddleocr==2.9.1` with `lang="en"`: PaddleOCR then loads its English
models (`en_PP-OCRv3_det`, `en_PP-OCRv4_rec`) where the wheel ships the Chinese-English ones (`ch_PP-OCRv4_det`,
`ch_PP-OCRv4_rec`: they read Latin text too), so scores on one image can differ slightly (pass the English ONNX files
through `engine_kwargs`, e.g. `{"det_model_path": ..., "rec_model_path": ..., "rec_keys_path": ...}`, to match); and
Flow-GRPO hands PaddleOCR an RGB array where it expects BGR, this reward gives it BGR.
"""

from PIL import Image

from .base import check_inputs, require

# PaddleOCR 2.x's text-detection defaults (`tools/infer/utility.py`), which Flow-GRPO runs with, where rapidocr's own
# differ (rapidocr: short side raised to 736 px, box threshold 0.5, unclip ratio 1.6, dilation on). With "max",
# rapidocr leaves images up to 2000 px unscaled where PaddleOCR shrinks the long side to 960 px: only larger images
# are read differently.
PADDLEOCR_DETECTION = {"det_limit_type": "max", "det_box_thresh": 0.6, "det_unclip_ratio": 1.5,
                       "det_use_dilation": False}


def quoted_text(prompt: str, row: int = 0) -> str:
    """The target text of a prompt: what stands between its first two double quotes (or after a lone first one)."""
    parts = prompt.split('"')
    if len(parts) < 2 or not parts[1].replace(" ", ""):
        raise ValueError(f'prompts[{row}]: expected the text to render between double quotes (a sign that reads '
                         f'"Open"), got {prompt!r}.')
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each), one row at a time."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(target: str, read: str) -> float:
    """`1 - min(d, len(target)) / len(target)` on lower-cased, space-free text; d = 0 when the target is contained."""
    target, read = target.replace(" ", "").lower(), read.replace(" ", "").lower()
    distance = 0 if target in read else min(levenshtein(read, target), len(target))
    return 1.0 - distance / len(target)


class OCRReward:
    """`load_reward("ocr")`: Flow-GRPO's OCR reward with PP-OCRv4 from `rapidocr-onnxruntime` (the `[ocr]` extra).

    Args:
        text_score: the recognition confidence below which a text box is ignored (PaddleOCR's default 0.5).
        num_threads: onnxruntime threads per model (-1: onnxruntime's choice, all cores).
        device: "cuda..." runs detection and recognition on the GPU with `onnxruntime-gpu` in place of `onnxruntime`
            (without it, rapidocr logs how to install it and runs on the CPU); anything else runs on the CPU.
        dtype, batch_size: accepted and ignored (the OCR model reads one image at a time, in float32), so the OCR
            reward loads wherever a model reward is loaded with them.
        engine_kwargs: more options of `rapidocr_onnxruntime.RapidOCR` (other model files; they override
            `PADDLEOCR_DETECTION`).
    """

    def __init__(self, text_score: float = 0.5, num_threads: int = -1, device=None, dtype=None, batch_size=None,
                 engine_kwargs: dict | None = None):
        rapidocr = require("rapidocr_onnxruntime", "OCR", extra="ocr")
        use_cuda = str(device or "cpu").startswith("cuda")
        self.engine = rapidocr.RapidOCR(use_cls=False, text_score=float(text_score), det_use_cuda=use_cuda,
                                        rec_use_cuda=use_cuda, intra_op_num_threads=num_threads,
                                        inter_op_num_threads=num_threads,
                                        **{**PADDLEOCR_DETECTION, **(engine_kwargs or {})})

    def read(self, image: Image.Image) -> str:
        """The text the OCR model reads in `image`: its kept boxes, joined in reading order."""
        boxes, _ = self.engine(image.convert("RGB"))  # a PIL image: rapidocr turns it into the BGR the models expect
        return "".join(text for _, text, _ in boxes or [])

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        check_inputs(images, prompts)
        targets = [quoted_text(prompt, row) for row, prompt in enumerate(prompts)]
        return [ocr_score(target, self.read(image)) for image, target in zip(images, targets)]
