"""GenEval's scoring rules on hand-made detections whose scores are worked out by hand (thresholds, suppression,
counting, colours, positions, strict and partial scores, the benchmark summary), and the reward's HTTP path against a
local detector server with scripted detections."""

import ast
import importlib.util
import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo_trainer.prompt_sets import geneval_metadata, load_prompt_sets
from diffusion_dpo_trainer.protocol import evaluate_protocol
from diffusion_dpo_trainer.rewards import load_reward
from diffusion_dpo_trainer.rewards.geneval import (
    Detection,
    GenEvalReward,
    box_iou,
    evaluate,
    relative_position,
    select,
    summarize,
)
from diffusion_dpo_trainer.rewards.http import RewardServerError

ROOT = Path(__file__).resolve().parent.parent


def det(x1, y1, x2, y2, score=0.99, color=None):
    return Detection((x1, y1, x2, y2), score, color)


def test_iou_uses_inclusive_pixel_corners():
    # two 10 x 10 boxes (0..9) overlapping on 5 x 5 pixels: 25 / (100 + 100 - 25)
    assert box_iou((0, 0, 9, 9), (5, 5, 14, 14)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_selection_thresholds_order_limit_and_suppression():
    dogs = [det(0, 0, 9, 9, 0.5), det(0, 0, 9, 9, 0.3), det(50, 50, 59, 59, 0.95), det(1, 1, 10, 10, 0.2)]
    assert [d.score for d in select({"dog": dogs}, "two_object")["dog"]] == [0.95, 0.5]  # > 0.3, best first
    assert [d.score for d in select({"dog": dogs}, "counting")["dog"]] == [0.95]  # > 0.9 for counting
    assert select({"dog": dogs[3:]}, "single_object") == {}  # a class with nothing left is absent
    assert [d.score for d in select({"dog": dogs}, "colors", max_objects=1)["dog"]] == [0.95]
    twins = [det(0, 0, 9, 9, 0.8), det(0, 0, 9, 8, 0.7), det(30, 30, 39, 39, 0.6)]
    assert len(select({"dog": twins}, "colors")["dog"]) == 3  # max_overlap 1.0: no suppression (official default)
    # IoU of the first two = 90 / 100 >= 0.5: the second is suppressed
    assert [d.score for d in select({"dog": twins}, "colors", max_overlap=0.5)["dog"]] == [0.8, 0.6]


def test_relative_position():
    a, b = det(0, 0, 10, 10), det(100, 0, 110, 10)
    assert relative_position(a, b) == {"left of"}  # offset -100, shrunk by 0.1 x 20: dx = -98 / 100
    assert relative_position(b, a) == {"right of"}
    assert relative_position(det(0, 200, 10, 210), a) == {"below"}  # image y grows downwards
    assert relative_position(det(0, 0, 0, 0), det(10, 10, 10, 10)) == {"left of", "above"}  # dx = dy = -0.707
    # centres 10 apart, sizes 100 + 100: the shrink (20) swallows the offset, no relation at all
    assert relative_position(det(0, 0, 100, 100), det(10, 0, 110, 100)) == set()
    # dx = (30 - 0.1 * 20) / |(30, 25)| = 28 / 39.05 = 0.717 -> right of; dy = 23 / 39.05 = 0.589 -> below
    assert relative_position(det(30, 25, 40, 35), det(0, 0, 10, 10)) == {"right of", "below"}


SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
COUNTING = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
            "prompt": "a photo of two dogs"}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}],
          "prompt": "a photo of a pink car"}
POSITION = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a dog right of a teddy bear"}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                               {"class": "scissors", "count": 1, "color": "black"}],
              "prompt": "a photo of a pink handbag and a black scissors"}
BEAR, DOG_RIGHT, DOG_LEFT = det(0, 0, 10, 10), det(100, 0, 110, 10), det(-100, 0, -90, 10)


@pytest.mark.parametrize(("detections", "metadata", "correct", "partial"), [
    ({"dog": [det(0, 0, 9, 9)]}, SINGLE, True, 1.0),
    ({"cat": [det(0, 0, 9, 9)]}, SINGLE, False, 0.0),  # count term 1 - |1 - 0| / 1
    # two dogs for "a dog": official correct (at least one), partial 1 - |1 - 2| / 1 = 0
    ({"dog": [det(0, 0, 9, 9), det(20, 20, 29, 29)]}, SINGLE, True, 0.0),
    # three confident dogs for "two dogs": the exclude clause (3 or more) fails; partial 1 - 1/2
    ({"dog": [det(0, 0, 9, 9, 0.95), det(20, 0, 29, 9, 0.93), det(40, 0, 49, 9, 0.92)]}, COUNTING, False, 0.5),
    # the third is below the counting threshold 0.9: exactly two
    ({"dog": [det(0, 0, 9, 9, 0.95), det(20, 0, 29, 9, 0.93), det(40, 0, 49, 9, 0.5)]}, COUNTING, True, 1.0),
    ({"dog": [det(0, 0, 9, 9, 0.95)]}, COUNTING, False, 0.5),
    ({"car": [det(0, 0, 9, 9, color="pink")]}, COLORS, True, 1.0),
    ({"car": [det(0, 0, 9, 9, color="red")]}, COLORS, False, 0.5),  # count 1, colour 1 - |1 - 0| / 1 = 0
    ({"teddy bear": [BEAR], "dog": [DOG_RIGHT]}, POSITION, True, 1.0),
    ({"teddy bear": [BEAR], "dog": [DOG_LEFT]}, POSITION, False, 2 / 3),  # terms 1, 1, 0
    ({"dog": [DOG_RIGHT]}, POSITION, False, 1 / 3),  # no bear: terms 0 (bear), 1 (dog), 0 (no target)
    ({"handbag": [det(0, 0, 9, 9, color="pink")], "scissors": [det(20, 0, 29, 9, color="black")]}, COLOR_ATTR,
     True, 1.0),
    # no scissors: terms 1, 1 (handbag) and 0, 0 (scissors: count, then its colour unchecked)
    ({"handbag": [det(0, 0, 9, 9, color="pink")]}, COLOR_ATTR, False, 0.5),
])
def test_rules_on_hand_made_detections(detections, metadata, correct, partial):
    result = evaluate(select(detections, metadata["tag"]), metadata)
    assert result.correct is correct
    assert result.partial == pytest.approx(partial)
    assert (result.reason == "") is correct


def test_colour_is_judged_on_the_most_confident_objects_only():
    metadata = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}]}
    cars = [det(0, 0, 9, 9, 0.6, "red"), det(20, 0, 29, 9, 0.8, "pink")]
    assert evaluate(select({"car": cars}, "colors"), metadata).correct  # the 0.8 car is pink
    cars = [det(0, 0, 9, 9, 0.9, "red"), det(20, 0, 29, 9, 0.8, "pink")]
    assert not evaluate(select({"car": cars}, "colors"), metadata).correct
    with pytest.raises(RewardServerError, match="without a 'color'"):
        evaluate({"car": [det(0, 0, 9, 9)]}, metadata)


def test_summary_is_the_mean_over_tasks():
    rows = ([{"tag": "counting", "prompt": "p1", "correct": c} for c in (True, False)]
            + [{"tag": "counting", "prompt": "p2", "correct": False}] * 2
            + [{"tag": "colors", "prompt": "p3", "correct": True}] * 2)
    summary = summarize(rows)
    assert summary["tasks"] == {"counting": 0.25, "colors": 1.0}
    assert summary["overall"] == pytest.approx(0.625)  # not the 3 / 6 share of correct images
    assert summary["correct_images"] == pytest.approx(0.5)
    assert summary["correct_prompts"] == pytest.approx(2 / 3)
    assert (summary["images"], summary["prompts"]) == (6, 3)


def test_official_prompts_ship_as_six_task_sets():
    sets = load_prompt_sets("geneval")
    sizes = {name: len(prompts) for name, prompts in sets.items()}
    assert sizes == {"geneval/single_object": 80, "geneval/two_object": 99, "geneval/counting": 80,
                     "geneval/colors": 94, "geneval/position": 100, "geneval/color_attr": 100}
    assert len(geneval_metadata()) == 553
    # every official prompt finds its metadata, and every row passes the metadata checks (positions, colours)
    prompts = [p for ps in sets.values() for p in ps]
    metadata = GenEvalReward("http://unused").metadata_for(prompts)
    assert [m["tag"] for m in metadata] == [name.split("/")[1] for name, ps in sets.items() for _ in ps]


class DetectorServer:
    """A local stand-in for the detector server: scripted detections per prompt; records each request."""

    def __init__(self, scripted):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(payload)
                body = json.dumps(scripted(payload)).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/detect"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


DETECTIONS = {  # per prompt, in the protocol's JSON
    "a photo of a bench": {"bench": [{"box": [0, 0, 9, 9], "score": 0.9}]},
    "a photo of two wine glasses": {"wine glass": [{"box": [0, 0, 9, 9], "score": 0.95},
                                                   {"box": [20, 0, 29, 9], "score": 0.8}]},
    "a photo of a pink car": {"car": [{"box": [0, 0, 9, 9], "score": 0.9, "color": "red"}]},
}


@pytest.fixture(scope="module")
def server():
    server = DetectorServer(lambda payload: {"detections": [DETECTIONS.get(p, {}) for p in payload["prompts"]]})
    yield server
    server.close()


def test_reward_over_http_with_the_official_metadata(server):
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    prompts = ["a photo of a bench", "a photo of two wine glasses", "a photo of a pink car"]
    reward = load_reward(f"geneval:{server.url}", batch_size=2)
    assert isinstance(reward, GenEvalReward)
    server.requests.clear()
    # bench found; one wine glass above the counting threshold 0.9 (of two); the car is red, not pink
    assert reward(images, prompts) == [1.0, 0.0, 0.0]
    assert [len(r["images"]) for r in server.requests] == [2, 1]
    assert server.requests[0]["metadata"][1]["exclude"] == [{"class": "wine glass", "count": 3}]
    assert load_reward(f"geneval-partial:{server.url}")(images, prompts) == pytest.approx([1.0, 0.5, 0.5])
    results = reward.evaluate(images, prompts)
    assert results[2].reason == "expected pink car>=1, found 0 pink; and 1 red"


def test_reward_takes_metadata_from_dataset_columns(server):
    reward = GenEvalReward(server.url)
    image = [Image.new("RGB", (16, 16))]
    # TRL's convention: columns arrive as keyword arguments, one value per image
    assert reward(image, ["a photo of a bench"], tag=["two_object"], include=[[{"class": "bench", "count": 1},
                                                                                {"class": "cat", "count": 1}]]) == [0.0]
    # called the TRL way, as the online trainers call a reward that takes `completions`
    assert reward(prompts=["a photo of a bench"], completions=image, trainer_state=None, tag=["single_object"],
                  include=[[{"class": "bench", "count": 1}]], other_column=["ignored"]) == [1.0]
    assert reward(image, ["my own bench prompt"], metadata=[json.dumps(SINGLE | {"include": [
        {"class": "dog", "count": 1}]})]) == [0.0]
    with pytest.raises(ValueError, match=r"prompts\[0\] 'my own bench prompt' is not one of GenEval's prompts"):
        reward(image, ["my own bench prompt"])
    with pytest.raises(ValueError, match=r"prompts\[0\], include\[0\]: color 'teal'"):
        reward(image, ["x"], include=[[{"class": "car", "count": 1, "color": "teal"}]])
    with pytest.raises(ValueError, match=r"include\[0\]: position"):
        reward(image, ["x"], include=[[{"class": "car", "count": 1, "position": ["above", 0]}]])
    with pytest.raises(ValueError, match="Column 'tag' has 2 values for 1 images"):
        reward(image, ["x"], tag=["colors", "colors"], include=[[{"class": "car", "count": 1}]])


def test_metadata_columns_of_a_dataset_reach_the_rules(server):
    """A `datasets` table of GenEval metadata (absent keys may come back as None) gives the reward its columns."""
    rows = [{"prompt": "a photo of a pink car", "tag": "colors", "exclude": None,
             "include": [{"class": "car", "count": 1, "color": "pink"}]},
            {"prompt": "a photo of two wine glasses", "tag": "counting",
             "include": [{"class": "wine glass", "count": 1}], "exclude": [{"class": "wine glass", "count": 2}]}]
    data = datasets.Dataset.from_list(rows)
    columns = {key: list(data[key]) for key in ("tag", "include", "exclude")}
    images = [Image.new("RGB", (8, 8))] * 2
    # the car is red; one wine glass above 0.9 (the 0.8 one falls under the counting threshold): correct
    assert GenEvalReward(server.url)(images, data["prompt"], **columns) == [0.0, 1.0]
    columns["include"][1][0]["count"] = 2  # now two are asked for: only one above the counting threshold
    assert GenEvalReward(server.url)(images, data["prompt"], **columns) == [0.0, 0.0]


def test_benchmark_through_the_evaluation_protocol(tmp_path, sd_path):
    """`evaluate` on the `geneval` prompt set: six task sets, the reward finds each prompt's metadata by itself, and
    the GenEval score is the mean of the task scores. The scripted detector satisfies the object tasks only."""
    def satisfied(metadata):
        return {c["class"]: [{"box": [0, 0, 9, 9], "score": 0.95, **({"color": c["color"]} if "color" in c else {})}]
                for c in metadata["include"]}

    detector = DetectorServer(lambda payload: {"detections": [
        satisfied(m) if m["tag"] in ("single_object", "two_object") else {} for m in payload["metadata"]]})
    try:
        report = evaluate_protocol(sd_path, ["geneval"], [GenEvalReward(detector.url)], str(tmp_path), seeds=[0, 1],
                                   max_prompts=1, num_inference_steps=2, resolution=32, batch_size=2, progress=False)
    finally:
        detector.close()
    means = {name: entry["GenEvalReward"]["base"]["mean"] for name, entry in report["results"].items()}
    assert means == {"geneval/single_object": 1.0, "geneval/two_object": 1.0, "geneval/counting": 0.0,
                     "geneval/colors": 0.0, "geneval/position": 0.0, "geneval/color_attr": 0.0}
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    summary = summarize([{"tag": r["set"].split("/")[1], "prompt": r["prompt"],
                          "correct": r["scores"]["GenEvalReward"] == 1.0} for r in rows])
    assert (summary["images"], summary["prompts"], summary["overall"]) == (12, 6, pytest.approx(2 / 6))


def test_bad_server_answers_and_a_missing_url_are_named():
    wrong = DetectorServer(lambda payload: {"detections": []})
    broken = DetectorServer(lambda payload: {"detections": [{"dog": [{"box": [0, 0, 1], "score": 0.9}]}]})
    try:
        with pytest.raises(RewardServerError, match="one dict per image for 1 images"):
            GenEvalReward(wrong.url)([Image.new("RGB", (8, 8))], ["a photo of a bench"])
        with pytest.raises(RewardServerError, match=r"detections\[0\]\['dog'\]: bad detection"):
            GenEvalReward(broken.url)([Image.new("RGB", (8, 8))], ["a photo of a bench"])
    finally:
        wrong.close()
        broken.close()
    with pytest.raises(ValueError, match="detector server's URL"):
        load_reward("geneval")


def fake_module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture
def recipe_server(monkeypatch, tmp_path):
    """examples/geneval_server.py with stand-ins for mmdet, open_clip and clip_benchmark: its detector "finds" one car
    in the left half of the image, and its colour classifier calls a crop red or blue by its mean colour."""
    names = ["person", "bicycle", "car"]
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "object_names.txt").write_text("\n".join(names) + "\n")
    seen = []

    def inference_detector(model, bgr):
        seen.append(bgr)
        height, width = bgr.shape[:2]
        bbox = [np.zeros((0, 5), np.float32) for _ in names]
        bbox[2] = np.array([[0, 0, width // 2 - 1, height - 1, 0.95], [0, 0, 3, 3, 0.2]], np.float32)
        masks = [[] for _ in names]
        masks[2] = [np.ones((height, width), bool), np.ones((height, width), bool)]
        return bbox, masks

    def encode_image(pixels):  # one-hot on "red" (index 0) or "blue" (index 4) by the crop's mean colour
        red = pixels[:, 0].mean(dim=(1, 2)) > pixels[:, 2].mean(dim=(1, 2))
        return torch.nn.functional.one_hot(torch.where(red, 0, 4), 10).float()

    clip_model = types.SimpleNamespace(encode_image=encode_image)
    transform = lambda image: torch.tensor(np.asarray(image.resize((4, 4))), dtype=torch.float32).permute(2, 0, 1)
    zsc = fake_module("zeroshot_classification", zero_shot_classifier=lambda *args: torch.eye(10, dtype=torch.float16))
    modules = {
        "mmdet": fake_module("mmdet", __file__=str(tmp_path / "mmdet" / "__init__.py")),
        "mmdet.apis": fake_module("mmdet.apis", init_detector=lambda *a, **k: "detector",
                                  inference_detector=inference_detector),
        "open_clip": fake_module("open_clip", create_model_and_transforms=lambda *a, **k: (clip_model, None, transform),
                                 get_tokenizer=lambda name: None),
        "clip_benchmark": fake_module("clip_benchmark"),
        "clip_benchmark.metrics": fake_module("clip_benchmark.metrics", zeroshot_classification=zsc),
        "clip_benchmark.metrics.zeroshot_classification": zsc,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("geneval_server", ROOT / "examples" / "geneval_server.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    server = recipe.make_server(recipe.Detector(str(tmp_path), str(tmp_path), "cpu"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/detect", seen
    server.shutdown()
    server.server_close()


def test_server_recipe_answers_the_client(recipe_server):
    """The recipe's request handling, BGR hand-over, 0.3 floor and colour classification, end to end with the client
    (the detector and CLIP are stand-ins: the real ones need GenEval's environment and a GPU)."""
    url, seen = recipe_server
    image = Image.new("RGB", (32, 16), "blue")
    image.paste((255, 0, 0), (0, 0, 16, 16))  # the car's half is red
    reward = GenEvalReward(url)
    red_car = [[{"class": "car", "count": 1, "color": "red"}]]
    assert reward([image], ["a red car"], tag=["colors"], include=red_car) == [1.0]
    assert seen[-1][0, 0].tolist() == [0, 0, 255]  # mmdet got BGR, as it reads image files
    detections = reward.detect([image], ["a red car"], [{"tag": "colors", "include": red_car[0]}])
    assert detections == [{"car": [Detection((0.0, 0.0, 15.0, 15.0), pytest.approx(0.95), "red")]}]  # 0.2 dropped
    assert reward([image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], ["a red car"], tag=["colors"],
                  include=red_car) == [0.0]
    # counting: the 0.95 car passes the 0.9 threshold, the 0.2 one never left the server
    assert reward([image], ["two cars"], tag=["counting"], include=[[{"class": "car", "count": 2}]]) == [0.0]


def test_server_recipe_is_python_3_9_and_stands_alone():
    """examples/geneval_server.py runs in GenEval's Python 3.9 environment, without this library."""
    source = (ROOT / "examples" / "geneval_server.py").read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "diffusion_dpo_trainer" not in imported and {"mmdet", "open_clip"} <= imported
