"""A reward served over HTTP, so a large reward model (UnifiedReward, GenEval's detector, ...) runs on another
machine, as Flow-GRPO does. Both sides are here: `HTTPReward` (the client, what `load_reward("http://...")`
returns) and `make_reward_server` (what `diffusion-dpo serve-reward` runs).

The protocol is one JSON request per batch:

    POST / or /score   {"prompts": ["a cat", ...], "images": ["<base64 PNG>", ...]}
    200                {"scores": [0.27, null, ...]}     one finite float per image, in order (null: not scored)
    4xx/5xx            {"error": "what was wrong"}

and `GET` on the same paths answers `{"reward": "<name>"}` (a health check).

The server is built for a shared network: one bad client must not stop the others, nor take the machine's memory.
Each connection has its own thread, and a client that stalls is dropped after `client_timeout` seconds (408); the
model runs one request at a time behind a lock (a GPU model is not re-entrant), and so does decoding, so at most
one request's pixels are in memory at once. Sizes are checked before the work they would cost: the body's length
before reading it (413), the images' dimensions from their headers before decoding them (413, per image and per
request). Every malformed request gets a 4xx with a JSON message; a reward that raises or returns a non-finite
score gets a 500 naming the reward and the image, never a NaN in the answer.
"""

import base64
import binascii
import io
import json
import math
import threading
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from . import scoring
from .base import check_inputs

#: What the server decodes: the client sends PNG; other formats PIL knows (EPS runs Ghostscript) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
#: The scoring endpoint's paths: `/score` (the documented URL) and `/` (what `serve-reward` prints).
PATHS = ("/", "/score")


class RewardServerError(OSError):
    """The reward server answered with an error or an unusable answer (an OSError, like urllib's HTTPError: the
    command line reports it in one line)."""


class RequestError(Exception):
    """A request the server refuses: the HTTP status and the message the client gets."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server scores the very pixels the client has
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def open_image(data: str, index: int, max_pixels: int) -> Image.Image:
    """`data` (base64) opened but not decoded: PIL reads only the header, so the size is checked before any pixel
    memory is spent."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"images[{index}]: not a base64-encoded image (bad base64: "
                           f"{exc})") from exc
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"images[{index}]: {exc}") from exc
    except Exception as exc:  # PIL raises several types for data it cannot identify
        raise RequestError(HTTPStatus.BAD_REQUEST, f"images[{index}]: not a base64-encoded image (PNG, JPEG or "
                           f"WebP; {exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"images[{index}] is {width} x {height} = "
                           f"{width * height} pixels; this server decodes at most {max_pixels} per image")
    return image


SERVE_HINT = "Start one with `diffusion-dpo serve-reward --reward NAME --port PORT`."


def post_json(url: str, payload: dict, timeout: float, start_hint: str = SERVE_HINT, what: str = "the request"):
    """POST `payload` as JSON and return the decoded answer. A rejection names the server's message; a refusal
    (nothing listens: start the server, `start_hint` says how) and a time-out (it listens but does not answer: a
    stuck or overloaded server, or too short a timeout) need different fixes, so they get different messages."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise RewardServerError(f"Reward server {url} rejected the request ({exc.code}): {message} ({what}).") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            message = f"Reward server {url} refused the connection: nothing listens there. Is it running? {start_hint}"
        elif isinstance(reason, TimeoutError):
            message = (f"Reward server {url} did not answer within {timeout:g} s: it accepted the connection but is "
                       "busy or stuck. Check its log, or raise the client's timeout (or lower its batch_size).")
        else:
            message = f"Reward server {url} failed ({reason}). Is it running? {start_hint}"
        raise ConnectionError(message) from exc
    except ValueError as exc:
        raise RewardServerError(f"Reward server {url} answered {what} with something that is not JSON ({exc}).") from exc


def decode_image(image: Image.Image, index: int) -> Image.Image:
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, zlib.error, ...
        raise RequestError(HTTPStatus.BAD_REQUEST, f"images[{index}]: truncated or corrupt image data ({exc})") from exc
    return image


def check_payload(payload, max_batch_size: int) -> tuple[list[str], list[str]]:
    """The prompts and base64 images of a request, or a RequestError naming the field that is wrong."""
    expected = 'Expected JSON {"prompts": [str, ...], "images": [base64 PNG, ...]}, one prompt per image.'
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is a JSON {type(payload).__name__}. {expected}")
    unknown = sorted(set(payload) - {"prompts", "images"})
    missing = [key for key in ("prompts", "images") if key not in payload]
    if unknown or missing:
        found = (f"missing {missing}" if missing else "") + ("; " if unknown and missing else "") + (
            f"unknown fields {unknown}" if unknown else "")
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{found}. {expected}")
    for key in ("prompts", "images"):
        values = payload[key]
        if not isinstance(values, list):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}' is a {type(values).__name__}, not a list. {expected}")
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{key}[{i}] is a {type(value).__name__}, not a "
                                   f"string. {expected}")
    prompts, images = payload["prompts"], payload["images"]
    if len(prompts) != len(images):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{len(images)} images but {len(prompts)} prompts. {expected}")
    if len(images) > max_batch_size:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{len(images)} images; this server takes at most "
                           f"{max_batch_size} per request: send fewer (the client's batch_size)")
    return prompts, images


#: The protocol's words in `check_scores`' errors: the JSON fields a client sees.
SERVER_NAMING = scoring.ScoreNaming(reward="reward", values="scores", image="images[{}]")


def check_scores(scores, prompts: list[str], name: str) -> list[float | None]:
    """`rewards.scoring.check_scores` in the protocol's words, with None (TRL's "not scored", JSON null) kept."""
    return [None if math.isnan(s) else s for s in scoring.check_scores(scores, prompts, name, naming=SERVER_NAMING)]


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

    def _post(self, payload: dict, first: int) -> list[float | None]:
        batch = f"images {first}-{first + len(payload['images']) - 1} of this call"
        answer = post_json(self.url, payload, self.timeout, what=batch)
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(payload["images"]):
            raise RewardServerError(f"Reward server {self.url} answered {answer!r}; expected {{'scores': [...]}} "
                                    f"with one float per image for {len(payload['images'])} images.")
        try:
            return check_scores(scores, payload["prompts"], self.url)
        except ValueError as exc:
            raise RewardServerError(f"Reward server {self.url} answered {batch} with an unusable score: "
                                    f"{exc}.") from exc

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float | None]:
        check_inputs(images, prompts)
        scores: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            scores += self._post({"prompts": list(prompts[start : start + self.batch_size]),
                                  "images": [encode_image(im) for im in images[start : start + self.batch_size]]},
                                 start)
        return scores


def make_reward_server(reward_fn, host: str = "127.0.0.1", port: int = 8000, name: str = "reward",
                       max_request_bytes: int = 256 * 2**20, max_batch_size: int = 256,
                       client_timeout: float = 60.0, max_image_pixels: int = 4096 * 4096,
                       max_request_pixels: int = 64 * 1024 * 1024) -> ThreadingHTTPServer:
    """A server that scores requests with `reward_fn`; run it with `serve_forever()`, stop with `shutdown()`.

    Port 0 picks a free port (`server.server_address[1]` tells which). `client_timeout` bounds every wait on a
    client (its headers, each read of its body); `max_image_pixels` and `max_request_pixels` bound the pixels
    decoded for one image and for one request (64 Mpx of RGB is 192 MiB).
    """
    model_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = client_timeout  # StreamRequestHandler sets it on the socket: every read and write is bounded

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body, allow_nan=False).encode()
            self.request_version = max(self.request_version, "HTTP/1.0")  # 0.9 (garbage parses as it) has no status
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("Connection", "close")
                    self.close_connection = True  # the rest of a refused body must not be read as a request
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client has gone: nobody to tell
                self.close_connection = True

        def send_error(self, code, message=None, explain=None):
            """The standard library's own refusals (bad request line, headers too long, ...) as JSON too."""
            self._send(code, {"error": message or explain or HTTPStatus(code).phrase})

        def __getattr__(self, attribute):
            if attribute.startswith("do_"):  # any method but GET and POST: 405, not the library's 501
                return self._method_not_allowed
            raise AttributeError(attribute)

        def _method_not_allowed(self):
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {self.command} not allowed: POST "
                                                                f"{PATHS[1]} to score images, GET for a health check"})

        def _path_ok(self) -> bool:
            if self.path.split("?", 1)[0] in PATHS:
                return True
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path!r}: POST images to {PATHS[1]} (or "
                                                       f"{PATHS[0]})"})
            return False

        def do_GET(self):
            if self._path_ok():
                self._send(HTTPStatus.OK, {"reward": name})

        def do_POST(self):
            if not self._path_ok():
                return
            try:
                prompts, images = check_payload(self._read_json(), max_batch_size)
                opened = [open_image(data, i, max_image_pixels) for i, data in enumerate(images)]
                pixels = sum(image.size[0] * image.size[1] for image in opened)
                if pixels > max_request_pixels:
                    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request's {len(opened)} images "
                                       f"have {pixels} pixels; this server decodes at most {max_request_pixels} "
                                       "per request: send fewer images per request (the client's batch_size)")
                with model_lock:  # one request's pixels at a time, and the model is not re-entrant
                    decoded = [decode_image(image, i) for i, image in enumerate(opened)]
                    try:
                        scores = check_scores(reward_fn(decoded, prompts), prompts, name)
                    except Exception as exc:  # noqa: BLE001 (the client gets the reason, not a dropped connection)
                        return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            except RequestError as exc:
                return self._send(exc.status, {"error": str(exc)})
            self._send(HTTPStatus.OK, {"scores": scores})

        def _read_json(self):
            if "Transfer-Encoding" in self.headers:
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (Transfer-"
                                   f"Encoding {self.headers['Transfer-Encoding']!r} is not accepted)")
            declared = self.headers.get_all("Content-Length") or []
            if not declared:
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "no Content-Length header: send the JSON body with one")
            if len(set(declared)) > 1 or not declared[0].strip().isdigit():
                raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {', '.join(declared)!r} is not one "
                                   "byte count")
            length = int(declared[0])
            if length > max_request_bytes:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request of {length} bytes; this server "
                                   f"takes at most {max_request_bytes}: send fewer images per request")
            body = bytearray()
            try:
                while len(body) < length:
                    chunk = self.rfile.read1(min(length - len(body), 2**20))
                    if not chunk:
                        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of the "
                                           f"{length} bytes its Content-Length announced")
                    body += chunk
            except TimeoutError as exc:
                raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"no data for {client_timeout:g} s after {len(body)} "
                                   f"of the {length} bytes its Content-Length announced") from exc
            try:
                return json.loads(body)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({exc})") from exc

    return ThreadingHTTPServer((host, port), Handler)  # a thread per connection, daemonic: none outlives the process
