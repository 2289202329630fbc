"""GenEval's official detector as an HTTP server for `load_reward("geneval:http://HOST:PORT/detect")`.

It runs in GenEval's own environment (Python 3.9, torch 1.12, mmcv-full 1.7, mmdet 2.x, open_clip, clip_benchmark:
GenEval's `environment.yml`), never beside diffusion-dpo-trainer, whose torch and Python it cannot share; the recipe
is in docs/rewards.md. It needs a GPU and the Mask2Former checkpoint, so this repository's tests run it with stand-ins
for mmdet, open_clip and clip_benchmark (tests/test_geneval.py), against the client and the rules
(`diffusion_dpo_trainer/rewards/geneval.py`).

What it does per image is what GenEval's `evaluation/evaluate_images.py` does before its rules: Mask2Former
(Swin-S, COCO) on the image, and, for the classes whose colour the metadata asks, CLIP ViT-L/14 (OpenAI weights)
zero-shot among ten colours on each object's crop (the object's mask over a #999 grey background, cropped to its
box), with GenEval's three prompt templates. The rules (thresholds, counting, positions) run in the client.

    python geneval_server.py --geneval-dir ~/geneval --model-path ~/geneval/models --port 18085

Protocol (see `rewards/geneval.py`):
    POST /detect {"images": [base64 PNG], "prompts": [str], "metadata": [{"tag", "include", "exclude"}]}
    200          {"detections": [{class: [{"box": [x1, y1, x2, y2], "score": float, "color"?: str}]}]}
"""

import argparse
import base64
import io
import json
import os
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

import mmdet
import numpy as np
import open_clip
import torch
from clip_benchmark.metrics import zeroshot_classification as zsc
from mmdet.apis import inference_detector, init_detector
from PIL import Image

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
MIN_SCORE = 0.3  # the lowest threshold the rules use: the client applies 0.3 or 0.9 (counting) itself


class Detector:
    def __init__(self, geneval_dir: str, model_path: str, device: str):
        config = os.path.join(os.path.dirname(mmdet.__file__), f"../configs/mask2former/{DETECTOR}.py")
        self.detector = init_detector(config, os.path.join(model_path, f"{DETECTOR}.pth"), device=device)
        self.clip, _, self.transform = open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai",
                                                                             device=device)
        self.tokenizer = open_clip.get_tokenizer("ViT-L-14")
        with open(os.path.join(geneval_dir, "evaluation", "object_names.txt")) as names:
            self.classnames = [line.strip() for line in names]
        self.device, self.classifiers = device, {}

    def classifier(self, classname: str) -> torch.Tensor:
        if classname not in self.classifiers:
            templates = [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}",
                         "a photo of a {c} object"]
            self.classifiers[classname] = zsc.zero_shot_classifier(self.clip, self.tokenizer, COLORS, templates,
                                                                   self.device)
        return self.classifiers[classname]

    @torch.no_grad()
    def colors(self, image: Image.Image, boxes, masks, classname: str) -> list:
        blank = Image.new("RGB", image.size, color="#999")
        crops = []
        for box, mask in zip(boxes, masks):
            crop = image if mask is None else Image.composite(image, blank, Image.fromarray(mask))
            crops.append(self.transform(crop.crop(tuple(box[:4]))))
        features = self.clip.encode_image(torch.stack(crops).to(self.device)).float()
        features = features / features.norm(dim=-1, keepdim=True)
        logits = features @ self.classifier(classname).float()  # clip_benchmark builds it under autocast
        return [COLORS[i] for i in logits.argmax(1).tolist()]

    def __call__(self, image: Image.Image, metadata: dict) -> dict:
        image = image.convert("RGB")
        # mmdet reads image files as BGR; GenEval hands it PNG files, so the array is flipped to BGR here
        result = inference_detector(self.detector, np.asarray(image)[:, :, ::-1].copy())
        bbox, segm = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
        colored = {clause["class"] for clause in metadata.get("include", []) if "color" in clause}
        found = {}
        for index, classname in enumerate(self.classnames):
            keep = np.flatnonzero(bbox[index][:, 4] > MIN_SCORE)
            if not len(keep):
                continue
            boxes = bbox[index][keep]
            detections = [{"box": [float(v) for v in b[:4]], "score": float(b[4])} for b in boxes]
            if classname in colored:
                masks = [None if segm is None else segm[index][i] for i in keep]
                for detection, color in zip(detections, self.colors(image, boxes, masks, classname)):
                    detection["color"] = color
            found[classname] = detections
        return found


def make_server(detector: Detector, host: str, port: int) -> HTTPServer:
    """One request at a time (`serve_forever`): the models are not re-entrant."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(HTTPStatus.OK, {"reward": "geneval-detector"})

        def do_POST(self):
            try:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in payload["images"]]
                metadata = payload["metadata"]
                if len(metadata) != len(images):
                    raise ValueError(f"{len(images)} images but {len(metadata)} metadata")
            except (ValueError, KeyError, TypeError, OSError) as exc:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {exc}"})
            try:
                detections = [detector(image, meta) for image, meta in zip(images, metadata)]
            except Exception as exc:  # noqa: BLE001 (the client gets the reason)
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            self._send(HTTPStatus.OK, {"detections": detections})

    return HTTPServer((host, port), Handler)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geneval-dir", required=True, help="A checkout of djghosh13/geneval (object_names.txt).")
    parser.add_argument("--model-path", required=True, help=f"The folder holding {DETECTOR}.pth "
                        "(GenEval's evaluation/download_models.sh).")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=18085)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    server = make_server(Detector(args.geneval_dir, args.model_path, args.device), args.host, args.port)
    print(f"GenEval detector on http://{args.host}:{args.port}/detect", flush=True)
    server.serve_forever()
