"""The OCR reward (Flow-GRPO's rules) on the real PP-OCRv4 models that `rapidocr-onnxruntime` ships: rendered text
scores 1, a misspelt rendering less, a blank image 0; the edit distance and the score against hand-computed values."""

import sys

import pytest
from PIL import Image, ImageDraw, ImageFont

from diffusion_dpo_trainer.prompt_sets import load_prompt_sets
from diffusion_dpo_trainer.rewards import load_reward
from diffusion_dpo_trainer.rewards.ocr import OCRReward, levenshtein, ocr_score, quoted_text


def rendered(text: str) -> Image.Image:
    """Black text on white in Pillow's own TrueType font (bundled with Pillow >= 10.1: no system font needed). Square:
    the detector scales the short side to 736 px, so a wide strip would cost more."""
    image = Image.new("RGB", (288, 288), "white")
    ImageDraw.Draw(image).text((24, 124), text, fill="black", font=ImageFont.load_default(size=40))
    return image


@pytest.fixture(scope="module")
def reward():
    return OCRReward(num_threads=1)


@pytest.mark.parametrize(("a", "b", "distance"), [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("same", "same", 0),
    ("abc", "cba", 2),
])
def test_levenshtein_matches_hand_values(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


@pytest.mark.parametrize(("read", "score"), [
    ("Hello World", 1.0),
    ("OPEN: hello world, today", 1.0),  # contained after lower-casing and removing spaces: d = 0
    ("helo world", 0.9),  # "heloworld" vs "helloworld": one insertion, 1 - 1/10
    ("hello wrld", 0.9),
    ("", 0.0),  # nothing read: d = len(target)
    ("completely unrelated long text", 0.0),  # d capped at len(target)
    ("hxllx wxrld", 0.7),  # three substitutions
])
def test_score_matches_hand_values(read, score):
    assert ocr_score("Hello World", read) == pytest.approx(score)


def test_target_is_the_first_quoted_text_and_a_prompt_without_one_is_named():
    assert quoted_text('A neon sign that reads "Open 24 Hours" above a "door"') == "Open 24 Hours"
    assert quoted_text('a mug with "Coffee') == "Coffee"  # an unclosed quote: the rest, as split('"')[1] gives
    with pytest.raises(ValueError, match=r"prompts\[3\].*double quotes"):
        quoted_text("a sign with no quoted text", row=3)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        quoted_text('an empty sign " "')


def test_real_model_scores_rendered_text(reward):
    assert reward.read(rendered("Hello World")).replace(" ", "").lower() == "helloworld"
    scores = reward([rendered("Hello World"), rendered("Hallo World"), Image.new("RGB", (288, 288), "white")],
                    ['a sign that says "Hello World"'] * 3)
    assert scores == pytest.approx([1.0, 0.9, 0.0])


def test_detection_runs_with_paddleocrs_defaults(reward):
    """Flow-GRPO's PaddleOCR 2.x detection settings, not rapidocr's own (736 px short side, 0.5, 1.6, dilation)."""
    detector = reward.engine.text_det
    assert (detector.limit_type, detector.postprocess_op.box_thresh, detector.postprocess_op.unclip_ratio,
            detector.postprocess_op.thresh, detector.postprocess_op.dilation_kernel) == ("max", 0.6, 1.5, 0.3, None)
    assert reward.engine.text_score == 0.5 and not reward.engine.use_cls


def test_errors_name_the_row_and_the_extra(reward, monkeypatch):
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        reward([rendered("Hi"), rendered("Hi")], ['"Hi"', "no quotes here"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward([rendered("Hi"), rendered("Hi")], ['"Hi"'])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        reward(["not an image"], ['"Hi"'])
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    with pytest.raises(ImportError, match=r"diffusion-dpo-trainer\[ocr\]"):
        load_reward("ocr")


def test_load_reward_builds_it_and_the_ocr_prompt_set_has_a_target_in_every_prompt():
    assert isinstance(load_reward("ocr", num_threads=1), OCRReward)
    prompts = load_prompt_sets("ocr")["ocr"]
    assert len(prompts) == 1018
    assert all(quoted_text(p, row) for row, p in enumerate(prompts))
