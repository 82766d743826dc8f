"""Tests for ``headstart serve``: a real uvicorn server in a subprocess, driven over HTTP by httpx.

The model is a tiny random-weight ResNet-18 at 32 px saved as a checkpoint here; answers are
compared with the Predictor's own, computed in this process one image at a time. The server runs
with small limits (0.25 MB uploads, 250,000 pixels, 4 images, 2 s to send a body) so every bad
input is cheap to make. The web page is driven in headless Chromium over the DevTools protocol
(the ``websockets`` package; nothing from npm), skipped when Chromium is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headstart as hs

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from headstart.deploy.batching import MicroBatcher  # noqa: E402
from headstart.deploy.runtime import open_predictor  # noqa: E402
from headstart.models import model_record  # noqa: E402

CLASSES = ["cat", "dog", "fox"]
LIMIT_FLAGS = ["--max-upload-mb", "0.25", "--max-pixels", "250000", "--max-images", "4", "--read-timeout", "2"]
SRC = Path(hs.__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    """A small noisy solid-colour PNG (noise so that different images give different logits)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def flat_png(size: tuple[int, int]) -> bytes:
    """A one-colour PNG: many pixels in few bytes."""
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(colour, (64, 48)))).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A 69-byte PNG that claims ``width x height`` pixels: the shape of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


IMAGES = {f"img{i}.png": png(((i * 53) % 256, (i * 97) % 256, (i * 31) % 256), seed=i) for i in range(12)}


def expected(predictor, data: bytes) -> np.ndarray:
    """The Predictor's own probabilities for one image, run alone (batch of one)."""
    x = predictor.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    z = predictor.logits(x)[0].astype(np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def check_answer(prediction: dict, probs: np.ndarray, k: int) -> None:
    """The server's top-k equals the Predictor's: same probabilities, same classes where not tied."""
    got = [(t["class"], t["probability"]) for t in prediction["top"]]
    assert len(got) == k
    order = np.argsort(probs)[::-1][:k]
    np.testing.assert_allclose([p for _, p in got], probs[order], atol=1e-4)
    for (name, _), i, j in zip(got, order, np.argsort(probs)[::-1][1 : k + 1]):
        if probs[i] - probs[j] > 1e-3:  # batching may reorder classes closer than float noise
            assert name == CLASSES[i]


def serve_command(source: Path, *flags: str) -> list[str]:
    """``python -m headstart serve ...`` once the CLI has the command, else the module's own entry."""
    from headstart.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["serve", str(source)])
        entry = ["-m", "headstart", "serve"]
    except SystemExit:  # "invalid choice: 'serve'": the CLI is not wired yet
        entry = ["-m", "headstart.deploy.serve_cli"]
    return [sys.executable, *entry, str(source), "--port", "0", *flags]


class Server:
    """A ``headstart serve`` subprocess on a free loopback port; its log goes to ``log_path``.

    ``--stop-after`` bounds it even if this test process dies; ``stop()`` sends SIGTERM.
    """

    def __init__(self, source: Path, log_path: Path, *flags: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        self.log_path = log_path
        with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(serve_command(source, "--stop-after", "300", *flags),
                                         stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        self.url = self._wait_for_url(timeout=120)

    def _wait_for_url(self, timeout: float) -> str:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("listening on "):
                url = line.split()[-1]
                self._wait_healthy(url, deadline)
                return url
        self.kill()
        pytest.fail(f"the server did not start; its log:\n{self.log()}")

    def _wait_healthy(self, url: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = hs.build_network("resnet18", "none", num_classes=len(CLASSES), input_size=32).eval()
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(model_record(net, CLASSES), path)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return open_predictor(checkpoint, backend="torch")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("server") / "serve.log",
               "--max-batch", "8", "--max-wait-ms", "50", *LIMIT_FLAGS)
    yield s
    s.kill()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def batching(client) -> dict:
    return client.get("/health").json()["batching"]


# --------------------------------------------------------------------------- the batcher alone


def test_batcher_gathers_concurrent_images_and_respects_max_batch():
    sizes = []
    batcher = MicroBatcher(lambda b: (sizes.append(len(b)), b.reshape(len(b), -1)[:, :3])[1], max_batch=4,
                           max_wait_ms=200)
    batcher.start()
    try:
        futures = [batcher.submit(np.full((3, 2, 2), i, np.float32)) for i in range(10)]
        answers = [f.result(10) for f in futures]
    finally:
        batcher.stop()
    assert sizes == [4, 4, 2]  # queued together: full batches, then the rest after max_wait
    assert [size for _, size in answers] == [4] * 8 + [2] * 2
    assert all(np.allclose(p, 1 / 3) for p, _ in answers)  # equal logits -> uniform softmax
    assert batcher.stats()["batch_sizes"] == {"2": 1, "4": 2}


def test_batcher_skips_cancelled_images_and_survives_a_failing_model():
    calls = []

    def infer(b: np.ndarray) -> np.ndarray:
        calls.append(len(b))
        if (b < 0).any():
            raise ValueError("negative input")
        return np.zeros((len(b), 2))

    batcher = MicroBatcher(infer, max_batch=8, max_wait_ms=100)
    batcher.start()
    try:
        bad, cancelled, good = (batcher.submit(np.full((1,), v, np.float32)) for v in (-1, 0, 1))
        cancelled.cancel()
        with pytest.raises(ValueError, match="negative"):
            bad.result(10)
        assert good.exception(10) is not None  # it shared the failed batch, and was told so
        later = batcher.submit(np.ones((1,), np.float32)).result(10)
    finally:
        batcher.stop()
    assert calls == [2, 1]  # the cancelled image never reached the model; the worker kept going
    assert later[1] == 1 and batcher.stats()["failed_batches"] == 1


# --------------------------------------------------------------------------- answers and batching


def test_health_and_metadata(client, predictor):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_id"] == predictor.model_id
    meta = client.get("/metadata").json()
    assert meta["classes"] == CLASSES and meta["num_classes"] == 3
    assert meta["preprocessing"]["crop"] == 32
    assert meta["model_card"].strip() and meta["limits"]["max_pixels"] == 250_000
    assert meta["batching"] == {"max_batch": 8, "max_wait_ms": 50.0, "max_queue": 256}


def test_raw_body_and_multipart_answers_match_the_predictor(client, predictor):
    data = IMAGES["img3.png"]
    r = client.post("/predict?top_k=2", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == predictor.model_id and body["top_k"] == 2 and body["time_ms"]["total"] > 0
    check_answer(body["predictions"][0], expected(predictor, data), 2)

    names = ["img0.png", "img1.png", "img2.png"]
    r = client.post("/predict", files=[("file", (n, IMAGES[n], "image/png")) for n in names])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["file"] for p in preds] == names
    for n, p in zip(names, preds):
        check_answer(p, expected(predictor, IMAGES[n]), 3)
        assert p["batch_size"] == 3  # one request's images share one forward pass


def test_concurrent_requests_are_answered_correctly_and_batched(client, predictor):
    before = batching(client)
    names = list(IMAGES) * 2

    async def burst() -> list:
        async with httpx.AsyncClient(base_url=client.base_url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/predict", content=IMAGES[n]) for n in names))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(names)
    for n, r in zip(names, responses):
        check_answer(r.json()["predictions"][0], expected(predictor, IMAGES[n]), 3)
    after = batching(client)
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == len(names)
    assert batches < images, f"{images} images ran in {batches} batches: nothing was batched"
    assert 1 < after["largest_batch"] <= 8
    assert max(r.json()["predictions"][0]["batch_size"] for r in responses) > 1


# --------------------------------------------------------------------------- bad input


def _chunks(total: int):
    for _ in range(total // 65536 + 1):
        yield b"\0" * 65536


BAD = {
    "zero-byte": (dict(content=b""), 400, "empty_file"),
    "not an image": (dict(content=b"this is a text file, not an image\n" * 4), 415, "not_an_image"),
    "truncated png": (dict(content=IMAGES["img0.png"][: len(IMAGES["img0.png"]) // 2]), 422, "corrupt_image"),
    "truncated jpeg": (dict(content=jpeg((10, 200, 30))[:400]), 422, "corrupt_image"),
    "pixels over --max-pixels": (dict(content=flat_png((600, 500))), 413, "too_many_pixels"),
    "PIL decompression bomb": (dict(content=png_header_only(20_000, 20_000)), 413, "too_many_pixels"),
    "oversized raw body": (dict(content=b"\0" * 400_000), 413, "upload_too_large"),
    "oversized chunked body": (dict(content=_chunks(400_000)), 413, "upload_too_large"),
    "oversized multipart": (dict(files=[("file", (f"{i}.png", b"\0" * 100_000)) for i in range(3)]), 413,
                            "upload_too_large"),
    "too many images": (dict(files=[("file", (n, IMAGES[n])) for n in list(IMAGES)[:5]]), 413, "too_many_images"),
    "multipart without files": (dict(content=b'--b\r\nContent-Disposition: form-data; name="note"'
                                             b'\r\n\r\nhi\r\n--b--\r\n',
                                     headers={"content-type": "multipart/form-data; boundary=b"}), 400, "no_image"),
    "url-encoded form": (dict(data={"note": "hello"}), 415, "not_an_image"),
    "multipart without boundary": (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
                                   400, "bad_multipart"),
    "one bad file among good": (dict(files=[("file", ("good.png", IMAGES["img1.png"])),
                                            ("file", ("notes.txt", b"just text"))]), 415, "not_an_image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_naming_the_problem(client, case):
    kwargs, status, code = BAD[case]
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["message"]
    if case == "one bad file among good":
        assert "notes.txt" in r.json()["message"]
    if case == "PIL decompression bomb":
        assert "decompression bomb" in r.json()["message"]
    assert client.post("/predict", content=IMAGES["img5.png"]).status_code == 200  # still serving


def test_bad_query_and_unknown_paths_get_json_errors(client):
    r = client.post("/predict?top_k=0", content=IMAGES["img0.png"])
    assert r.status_code == 400 and r.json()["error"] == "bad_top_k"
    assert client.get("/nowhere").json()["error"] == "not_found"
    assert client.get("/predict").status_code == 405


def test_declared_oversize_is_refused_before_the_body_is_sent(server):
    # Headers only: the answer must come without the server waiting for 50 MB that never arrive.
    with socket.create_connection(_address(server)) as s:
        s.settimeout(10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        answer = read_response(s)
    assert answer.startswith("HTTP/1.1 413") and "upload_too_large" in answer


def test_a_client_that_stalls_mid_upload_gets_408(server):
    with socket.create_connection(_address(server)) as s:
        s.settimeout(15)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"\x89PNG" + b"\0" * 100)
        answer = read_response(s)  # --read-timeout 2: answered after about 2 s
    assert answer.startswith("HTTP/1.1 408") and "upload_too_slow" in answer


def test_clients_disconnecting_mid_upload_cost_nothing(client, server):
    before = client.get("/health").json()["requests"]["client_disconnects"]
    for _ in range(3):
        with socket.create_connection(_address(server)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 200000\r\n\r\n"
                      + IMAGES["img0.png"][:500])
            time.sleep(0.05)  # let the server start reading, then vanish
    deadline = time.monotonic() + 10
    while client.get("/health").json()["requests"]["client_disconnects"] < before + 3:
        assert time.monotonic() < deadline, "the server never noticed the disconnects"
        time.sleep(0.1)
    assert client.post("/predict", content=IMAGES["img2.png"]).status_code == 200


def test_a_burst_of_malformed_requests_leaves_the_server_healthy(client, server, predictor):
    cases = [BAD[c][0] for c in BAD if "chunked" not in c] * 4  # a generator body can be sent only once

    async def burst() -> list:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/predict", **kw) for kw in cases), return_exceptions=True)

    answers = asyncio.run(burst())
    statuses = [a.status_code for a in answers if not isinstance(a, Exception)]
    assert len(statuses) == len(cases) and all(400 <= s < 500 for s in statuses)
    with socket.create_connection(_address(server)) as s:  # not even HTTP
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    r = client.post("/predict", content=IMAGES["img7.png"])
    check_answer(r.json()["predictions"][0], expected(predictor, IMAGES["img7.png"]), 3)


def read_response(s: socket.socket) -> str:
    """One HTTP response read off a raw socket: the head, then ``content-length`` bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096) or pytest.fail(f"connection closed after {data!r}")
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(ln.split(b":")[1] for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096) or pytest.fail("connection closed mid-body")
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# --------------------------------------------------------------------------- the command line


def test_sigterm_stops_the_server_cleanly_with_one_log_line_per_request(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path / "serve.log", "--backend", "torch", "--max-batch", "1")
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert c.post("/predict", content=IMAGES["img0.png"]).json()["predictions"][0]["batch_size"] == 1
            assert c.post("/predict", content=b"").status_code == 400
            assert c.get("/metadata").status_code == 200
        # the readiness probe made GET /health requests before these three
        start = time.monotonic()
        assert s.stop() == 0
        assert time.monotonic() - start < 10
    finally:
        s.kill()
    lines = [ln for ln in s.log().splitlines() if "headstart.serve: 127.0.0.1:" in ln]
    assert [ln.split()[5:8] for ln in lines if "/health" not in ln] == [
        ["POST", "/predict", "200"], ["POST", "/predict", "400"], ["GET", "/metadata", "200"]]
    assert "received SIGTERM" in s.log() and "Traceback" not in s.log()


def test_cli_refuses_bad_flags_and_a_busy_port(checkpoint, capsys):
    from headstart.deploy.serve_cli import main

    assert main([str(checkpoint), "--max-batch", "0"]) == 2
    assert "--max-batch must be positive" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main([str(checkpoint), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# --------------------------------------------------------------------------- the page in Chromium


class DevTools:
    """The least of Chrome's DevTools protocol: commands on one page session, over a WebSocket."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id, self.session = ws, 0, None

    def call(self, method: str, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:  # events arrive between answers; skip them
            answer = json.loads(self.ws.recv(timeout=30))
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@contextlib.contextmanager
def chromium(profile: Path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    ws_client = pytest.importorskip("websockets.sync.client")
    proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        with ws_client.connect(f"ws://127.0.0.1:{port}{path}", max_size=2**24) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_page_shows_the_predicted_class_of_a_chosen_image(server, predictor, tmp_path):
    image = tmp_path / "red fox.png"
    image.write_bytes(IMAGES["img4.png"])
    probs = expected(predictor, IMAGES["img4.png"])
    with chromium(tmp_path / "profile") as dt:
        target = dt.call("Target.createTarget", url="about:blank")["targetId"]
        dt.session = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        dt.call("Page.navigate", url=server.url + "/")
        assert "3 classes" in dt.wait_for("document.getElementById('model').textContent.includes('classes') && "
                                          "document.getElementById('model').textContent")
        root = dt.call("DOM.getDocument")["root"]["nodeId"]
        node = dt.call("DOM.querySelector", nodeId=root, selector="input[type=file]")["nodeId"]
        dt.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        dt.wait_for("document.querySelector('.card') && document.querySelector('.card').dataset.status !== 'pending'")
        card = dt.js("(() => { const c = document.querySelector('.card'); return {status: c.dataset.status, "
                     "top: c.dataset.top, text: c.innerText, bars: c.querySelectorAll('.bar > span').length}; })()")
    assert card["status"] == "done", card
    assert card["top"] == CLASSES[int(np.argmax(probs))]
    assert "red fox.png" in card["text"] and f"{100 * probs.max():.1f}%" in card["text"]
    assert card["bars"] == 3
