"""`serve-reward`'s server and the HTTP client against bad days: slow and hostile clients (raw sockets), malformed
requests, images too large to decode, a reward that returns NaN, a server that is down or stuck. Every server here is
real (127.0.0.1, port 0, in a thread) and scores with a one-line reward, so the module runs in seconds."""

import base64
import io
import json
import math
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusion_dpo_trainer.rewards.http import HTTPReward, RewardServerError, encode_image, make_reward_server


def brightness(images, prompts):
    return [float(np.asarray(image.convert("L")).mean()) for image in images]


def picture(width=8, height=8, value=100) -> Image.Image:
    return Image.new("RGB", (width, height), (value, value, value))


def png_claiming(width: int, height: int) -> bytes:
    """A real 8 x 8 PNG whose header claims `width` x `height`: decoding it would fail, so a refusal that names its
    size proves the size was read from the header, before any decoding."""
    data = io.BytesIO()
    picture().save(data, format="PNG")
    data = bytearray(data.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # width, height, then depth, colour, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def truncated_png() -> bytes:
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data, format="PNG")
    return data.getvalue()[: len(data.getvalue()) // 2]  # the header is whole, the pixel data cut


@pytest.fixture(scope="module")
def serve():
    """serve(reward_fn, **make_reward_server kwargs) -> port of a running server; all are stopped at the end."""
    started = []

    def start(reward_fn=brightness, **kwargs):
        server = make_reward_server(reward_fn, "127.0.0.1", 0, name="bright", **kwargs)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server.server_address[1]

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def exchange(port: int, raw: bytes, done_sending: bool = True) -> tuple[int, dict]:
    """Send `raw` bytes (and, if `done_sending`, close the sending side), read the whole answer: (status, JSON)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(raw)
        if done_sending:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(body: bytes, path: str = "/score", headers: str | None = None) -> bytes:
    headers = f"Content-Length: {len(body)}\r\n" if headers is None else headers
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


def payload(images, prompts=None) -> bytes:
    encoded = [base64.b64encode(i).decode() if isinstance(i, bytes) else encode_image(i) for i in images]
    return json.dumps({"prompts": prompts or ["p"] * len(images), "images": encoded}).encode()


def test_a_client_that_sends_headers_and_no_body_blocks_nobody_and_is_dropped(serve):
    port = serve(client_timeout=30)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
        stalled.sendall(post(b"", headers="Content-Length: 100\r\n"))  # ... and never the 100 bytes
        scores = HTTPReward(f"http://127.0.0.1:{port}/score", timeout=20)([picture(value=10)], ["a"])
        assert scores == [10.0]  # answered while the stalled client still holds its connection
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):
            stalled.recv(1)  # not answered yet: it is still being waited for
    quick = serve(client_timeout=0.2)
    status, body = exchange(quick, post(b"", headers="Content-Length: 100\r\n"), done_sending=False)
    assert status == 408 and "no data for 0.2 s after 0 of the 100 bytes" in body["error"]


def test_the_model_scores_one_request_at_a_time(serve):
    running, overlaps = [], []

    def careful(images, prompts):
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.05)
        running.pop()
        return brightness(images, prompts)

    url = f"http://127.0.0.1:{serve(careful)}/score"
    results = {}
    threads = [threading.Thread(target=lambda v=v: results.update({v: HTTPReward(url, timeout=30)([picture(value=v)],
                                                                                                    ["a"])}))
               for v in (1, 2, 3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {1: [1.0], 2: [2.0], 3: [3.0], 4: [4.0]}
    assert overlaps == [1, 1, 1, 1]


MALFORMED = [  # (raw request, status, what the message says)
    (post(b"{not json"), 400, "not JSON"),
    (post(b"\xff\xfe"), 400, "not JSON"),
    (post(b"[1, 2]"), 400, "the body is a JSON list"),
    (post(b'{"prompts": ["a"]}'), 400, "missing ['images']"),
    (post(b'{"prompts": ["a"], "images": [], "seed": 1}'), 400, "unknown fields ['seed']"),
    (post(b'{"prompts": "a", "images": []}'), 400, "'prompts' is a str, not a list"),
    (post(b'{"prompts": [1], "images": ["x"]}'), 400, "prompts[0] is a int, not a string"),
    (post(payload([picture()], ["a", "b"])), 400, "1 images but 2 prompts"),
    (post(b'{"prompts": ["a"], "images": ["not base64!"]}'), 400, "images[0]: not a base64-encoded image (bad base64"),
    (post(payload([b"plain text, not an image"])), 400, "images[0]: not a base64-encoded image (PNG, JPEG or WebP"),
    (post(payload([picture(), truncated_png()])), 400, "images[1]: truncated or corrupt image data"),
    (post(b"{}", headers=""), 411, "no Content-Length header"),
    (post(b"", headers="Content-Length: abc\r\n"), 400, "Content-Length 'abc' is not one byte count"),
    (post(b"", headers="Content-Length: -5\r\n"), 400, "Content-Length '-5' is not one byte count"),
    (post(b"", headers="Content-Length: 5\r\nContent-Length: 6\r\n"), 400, "'5, 6' is not one byte count"),
    (post(b"", headers="Transfer-Encoding: chunked\r\n"), 411, "Transfer-Encoding 'chunked' is not accepted"),
    (post(b"", headers=f"Content-Length: {10**12}\r\n"), 413, f"request of {10**12} bytes; this server takes at most"),
    (post(b"{}", path="/admin"), 404, "no endpoint '/admin'"),
    (b"PUT /score HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "method PUT not allowed"),
    (b"BREW /score HTTP/1.1\r\n\r\n", 405, "method BREW not allowed"),
    (b"\x16\x03\x01 garbage\r\n\r\n", 400, "Bad HTTP/0.9 request type"),
]


def test_every_malformed_request_gets_a_4xx_and_a_message_and_the_server_keeps_serving(serve):
    calls = []
    port = serve(lambda images, prompts: calls.append(len(images)) or brightness(images, prompts),
                 max_request_bytes=2**20)
    for raw, status, message in MALFORMED:
        got, body = exchange(port, raw)
        assert (got, message in body["error"]) == (status, True), (raw[:60], got, body)
    # A body shorter than its Content-Length, then the client closes its side.
    got, body = exchange(port, post(b'{"prompts": [', headers="Content-Length: 50\r\n"))
    assert got == 400 and "the body ended after 13 of the 50 bytes" in body["error"]
    assert calls == []  # the reward never saw any of them
    assert exchange(port, b"GET /score HTTP/1.1\r\n\r\n") == (200, {"reward": "bright"})
    assert exchange(port, post(payload([picture(value=7)]))) == (200, {"scores": [7.0]})


def test_pixels_are_capped_per_image_and_per_request_before_decoding(serve):
    calls = []
    port = serve(lambda images, prompts: calls.append(len(images)) or brightness(images, prompts),
                 max_image_pixels=5000 * 5000, max_request_pixels=3 * 40 * 40)
    status, body = exchange(port, post(payload([picture(), png_claiming(6000, 5000)])))
    assert status == 413 and body["error"].startswith("images[1] is 6000 x 5000 = 30000000 pixels; this server "
                                                      "decodes at most 25000000 per image")
    status, body = exchange(port, post(payload([png_claiming(100000, 100000)])))  # past PIL's own bomb limit
    assert status == 413 and "images[0]" in body["error"] and "decompression bomb" in body["error"]
    four = [picture(40, 40, value=v) for v in (1, 2, 3, 4)]
    status, body = exchange(port, post(payload(four)))
    assert status == 413 and "4 images have 6400 pixels; this server decodes at most 4800 per request" in body["error"]
    assert calls == []
    assert HTTPReward(f"http://127.0.0.1:{port}/", batch_size=3)(four, ["a"] * 4) == [1.0, 2.0, 3.0, 4.0]


def test_a_non_finite_score_is_an_error_naming_the_reward_and_the_image(serve):
    def broken(images, prompts):
        return [1.0, math.nan, None][: len(images)]

    url = f"http://127.0.0.1:{serve(broken)}/score"
    with pytest.raises(RewardServerError, match=r"\(500\): ValueError: reward 'bright' returned nan for images\[1\] "
                                                r"\(prompt 'a dog'\); expected a finite number"):
        HTTPReward(url)([picture(), picture()], ["a cat", "a dog"])
    inf = f"http://127.0.0.1:{serve(lambda images, prompts: [math.inf])}/score"
    with pytest.raises(RewardServerError, match=r"\(500\): ValueError: reward 'bright' returned inf for images\[0\]"):
        HTTPReward(inf)([picture()], ["a cat"])
    # The rules of rewards.scoring.check_scores: a string is not a score, even one that parses as a number.
    text = f"http://127.0.0.1:{serve(lambda images, prompts: ['1.5'])}/score"
    with pytest.raises(RewardServerError, match=r"\(500\): NotAScoreError: reward 'bright' returned '1.5' \(str\) for "
                                                r"images\[0\] \(prompt 'a cat'\); expected a number"):
        HTTPReward(text)([picture()], ["a cat"])
    # None is TRL's "not scored": it passes through as null, and the client returns None.
    none = f"http://127.0.0.1:{serve(lambda images, prompts: [None, 2])}/score"
    assert HTTPReward(none)([picture(), picture()], ["a", "b"]) == [None, 2.0]


@pytest.fixture(scope="module")
def stub():
    """stub(body) -> URL of a server that answers every POST with `body` (what a broken or foreign server sends)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    servers = []

    def start(body: bytes):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/score"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_client_refuses_an_answer_it_cannot_use(stub):
    two = ([picture(), picture()], ["a", "b"])
    with pytest.raises(RewardServerError, match=r"answered \{'scores': \[1.0\]\}; expected.*for 2 images"):
        HTTPReward(stub(b'{"scores": [1.0]}'))(*two)
    with pytest.raises(RewardServerError, match=r"unusable score: reward .* returned nan for images\[1\] \(prompt "
                                                r"'b'\)"):
        HTTPReward(stub(b'{"scores": [1.0, NaN]}'))(*two)
    with pytest.raises(RewardServerError, match="answered images 0-1 of this call with something that is not JSON"):
        HTTPReward(stub(b"<html>proxy error</html>"))(*two)


def test_the_client_tells_refused_from_timed_out():
    with socket.socket() as listening:  # accepts connections (the kernel's backlog) and never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        url = f"http://127.0.0.1:{listening.getsockname()[1]}/score"
        with pytest.raises(ConnectionError, match=r"did not answer within 0.3 s: it accepted the connection but is "
                                                  "busy or stuck") as timed_out:
            HTTPReward(url, timeout=0.3)([picture()], ["a"])
    with pytest.raises(ConnectionError, match=r"refused the connection: nothing listens there. Is it running\? "
                                              "Start one with `diffusion-dpo serve-reward") as refused:
        HTTPReward(url, timeout=5)([picture()], ["a"])  # the same port, now closed
    assert "refused" not in str(timed_out.value) and "did not answer" not in str(refused.value)
