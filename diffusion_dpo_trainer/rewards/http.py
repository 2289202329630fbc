"""A reward served over HTTP, so a large reward model (UnifiedReward, GenEval's detector, ...) runs on another
machine, as Flow-GRPO does. Both sides are here: `HTTPReward` (the client, what `load_reward("http://...")`
returns) and `make_reward_server` (what `diffusion-dpo serve-reward` runs).

The protocol is one JSON request per batch:

    POST <url>   {"prompts": ["a cat", ...], "images": ["<base64 PNG>", ...]}
    200          {"scores": [0.27, ...]}                       one float per image, in order
    4xx/5xx      {"error": "what was wrong"}

and `GET <url>` answers `{"reward": "<name>"}` (a health check). The server scores one request at a time (a GPU
model is not re-entrant) and refuses bodies over `max_request_bytes` and batches over `max_batch_size`.
"""

import base64
import io
import json
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

from PIL import Image

from .base import check_inputs


class RewardServerError(OSError):
    """The reward server answered with an error or an unusable answer (an OSError, like urllib's HTTPError: the
    command line reports it in one line)."""


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server scores the very pixels the client has
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, index: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except Exception as exc:
        raise ValueError(f"images[{index}]: not a base64-encoded image ({exc})") from exc
    return image


SERVE_HINT = "Start one with `diffusion-dpo serve-reward --reward NAME --port PORT`."


def post_json(url: str, payload: dict, timeout: float, start_hint: str = SERVE_HINT):
    """POST `payload` as JSON and return the decoded answer; a refusal and an absent server get errors that say so
    (`start_hint`: how to start the server)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise RewardServerError(f"Reward server {url} rejected the request ({exc.code}): {message}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"Reward server {url} did not answer within {timeout:g} s ({reason}). Is it running? {start_hint}"
        ) from exc


class HTTPReward:
    """Client of a reward server: `reward(images, prompts)` posts them in batches of `batch_size`.

    Args:
        url: the server's endpoint, e.g. `http://gpu-box:8000/score`.
        timeout: seconds to wait for one batch (connect and response) before failing.
        batch_size: images per request.
        device, dtype: accepted and ignored (the server chooses its own), so an HTTP reward can stand wherever a
            model reward is loaded with them.
    """

    def __init__(self, url: str, timeout: float = 120.0, batch_size: int = 16, device=None, dtype=None):
        self.url, self.timeout, self.batch_size = url, timeout, batch_size

    def _post(self, payload: dict) -> list[float]:
        answer = post_json(self.url, payload, self.timeout)
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(payload["images"]):
            raise RewardServerError(f"Reward server {self.url} answered {answer!r}; expected {{'scores': [...]}} "
                                    f"with one float per image for {len(payload['images'])} images.")
        return [float(s) for s in scores]

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        check_inputs(images, prompts)
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            scores += self._post({"prompts": list(prompts[start : start + self.batch_size]),
                                  "images": [encode_image(im) for im in images[start : start + self.batch_size]]})
        return scores


def make_reward_server(reward_fn, host: str = "127.0.0.1", port: int = 8000, name: str = "reward",
                       max_request_bytes: int = 256 * 2**20, max_batch_size: int = 256) -> HTTPServer:
    """An `HTTPServer` that scores requests with `reward_fn`; run it with `serve_forever()`, stop with `shutdown()`.

    Port 0 picks a free port (`server.server_address[1]` tells which).
    """

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(HTTPStatus.OK, {"reward": name})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_request_bytes:
                message = f"request of {length} bytes; this server takes at most {max_request_bytes}"
                return self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": message})
            try:
                payload = json.loads(self.rfile.read(length))
                prompts, images = payload["prompts"], payload["images"]
                if not isinstance(images, list) or len(images) > max_batch_size:
                    raise ValueError(f"'images' must be a list of at most {max_batch_size} base64 images")
                images = [decode_image(data, i) for i, data in enumerate(images)]
                check_inputs(images, prompts)
            except (ValueError, KeyError, TypeError) as exc:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {exc}. Expected JSON "
                                                           '{"prompts": [str], "images": [base64 PNG]}.'})
            try:
                scores = [float(s) for s in reward_fn(images, prompts)]
            except Exception as exc:  # noqa: BLE001 (the client gets the reason instead of a dropped connection)
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            self._send(HTTPStatus.OK, {"scores": scores})

    return HTTPServer((host, port), Handler)
