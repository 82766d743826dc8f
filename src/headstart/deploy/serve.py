"""``headstart serve``: a trained classifier behind HTTP, on FastAPI and uvicorn.

Endpoints:

- ``POST /predict[?top_k=K]``: one image as the raw body, or several as ``multipart/form-data``
  file parts. Answers ``{"model_id", "backend", "top_k", "predictions": [{"file", "top":
  [{"class", "probability"}...], "batch_size"}...], "time_ms": {"read", "decode", "model",
  "total"}}``. ``batch_size`` is how many images shared that forward pass.
- ``GET /health``: ``{"status": "ok", ...}`` with the request and batching statistics.
- ``GET /metadata``: classes, preprocessing, model card, limits and batching settings.
- ``GET /``: a one-file web page to drop images on and see their top classes.

Images from concurrent requests are micro-batched (:mod:`headstart.deploy.batching`); uploads are
read within size, pixel and time limits (:mod:`headstart.deploy.uploads`), and every refusal is a
4xx JSON ``{"error": code, "message": sentence}``. Every request writes one log line.

Example::

    from headstart.deploy.runtime import open_predictor
    from headstart.deploy.serve import serve
    serve(open_predictor("runs/my-run"), port=8000)     # blocks; SIGTERM or Ctrl-C stops it
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..errors import HeadstartError
from .batching import Busy, MicroBatcher
from .uploads import FORMATS, BadInput, Limits, decode_image, read_images

log = logging.getLogger("headstart.serve")


class Stats:
    """Request counters shown by ``/health`` (the batcher keeps its own)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.lock = threading.Lock()
        self.by_status: dict[str, int] = {}
        self.disconnects = 0

    def count(self, status: int) -> None:
        with self.lock:
            self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": sum(self.by_status.values()), "by_status": dict(sorted(self.by_status.items())),
                    "client_disconnects": self.disconnects, "uptime_s": round(time.time() - self.started, 1)}


class RequestLog:
    """ASGI middleware: one log line per HTTP request (client, method, path, status, time, note).

    Handlers add a note (``images=2 batch=2`` or an error code) in ``scope["state"]["log_note"]``.
    A pure ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which would wrap the
    body stream and hide a client's disconnect from the handler.
    """

    def __init__(self, app: Any, stats: Stats) -> None:
        self.app, self.stats = app, stats

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_noting_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.stats.count(status[0])
            client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
            query = "?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else ""
            note = scope.get("state", {}).get("log_note", "")
            ms = (time.perf_counter() - start) * 1000
            log.info("%s %s %s%s %d %.1fms %s", client, scope["method"], scope["path"], query, status[0], ms, note)


def create_app(predictor: Any, *, max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 256,
               limits: Limits | None = None, model_card: str = "", decode_threads: int | None = None) -> FastAPI:
    """The FastAPI application serving ``predictor`` (a :class:`headstart.deploy.runtime.Predictor`).

    ``decode_threads`` bounds how many uploads are decoded at once (default: the CPU count, at
    most 4). Under load, decoding 32 images at once on 2 cores finishes none of them sooner: it
    only steals the cores from the model and stretches the latency tail; waiting requests queue
    in order for a decoding thread instead.

    The batcher's worker thread starts and stops with the application (its lifespan), so an
    application made here can also be driven in-process, e.g. by ``fastapi.testclient``.
    """
    # long function: FastAPI routes are closures over this one service's batcher, limits and
    # stats; the factory keeps the whole HTTP surface on one screen-and-a-half to read.
    limits = limits or Limits()
    batcher = MicroBatcher(predictor.logits, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    stats = Stats()
    classes = list(predictor.classes)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    decoders = anyio.CapacityLimiter(decode_threads or min(4, os.cpu_count() or 1))

    @asynccontextmanager
    async def lifespan(_: Any):
        batcher.start()
        log.info("model %s (%s backend, %d classes): batches of up to %d, waiting up to %g ms",
                 predictor.model_id, predictor.backend, len(classes), max_batch, max_wait_ms)
        yield
        batcher.stop()

    app = FastAPI(title="headstart serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestLog, stats=stats)

    def refuse(request: Request, status: int, body: dict[str, str]) -> JSONResponse:
        request.state.log_note = body["error"]
        return JSONResponse(body, status_code=status)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput) -> JSONResponse:
        return refuse(request, exc.status, exc.to_dict())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return refuse(request, exc.status_code, {"error": code, "message": f"{request.method} {request.url.path}: "
                                                                             f"{exc.detail}"})

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        # The page is one file with inline script and style: the policy makes "no external
        # resources" something the browser enforces, not a promise.
        csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; " \
              "connect-src 'self'"
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_id": predictor.model_id, "backend": predictor.backend,
                "requests": stats.to_dict(), "batching": batcher.stats()}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        meta = {k: v for k, v in predictor.metadata.items() if k != "card"}  # the card is shown on its own
        return {"model_id": predictor.model_id, "backend": predictor.backend, "classes": classes,
                "num_classes": len(classes), "preprocessing": meta.get("preprocessing"),
                "model_card": model_card, "model": meta, "limits": limits.to_dict(),
                "formats": list(FORMATS), "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms,
                                                      "max_queue": max_queue}}

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        start = time.perf_counter()
        top_k = parse_top_k(request.query_params.get("top_k"), len(classes))
        try:
            files = await read_images(request, limits)
        except ClientDisconnect:
            # Nothing was queued and nothing is kept: the parser has closed its spooled files.
            with stats.lock:
                stats.disconnects += 1
            request.state.log_note = "client disconnected mid-upload"
            return Response(status_code=499)  # nginx's code; uvicorn drops it, the client is gone
        read_done = time.perf_counter()
        # Decoding and resizing are CPU work: off the event loop, like inference.
        arrays = await anyio.to_thread.run_sync(_prepare_all, predictor, files, limits, limiter=decoders)
        decode_done = time.perf_counter()
        try:
            answers = await batcher.run(arrays)
        except Busy as e:
            return refuse(request, 503, {"error": "busy", "message": f"the server is busy ({e}); retry shortly"})
        done = time.perf_counter()
        request.state.log_note = f"images={len(files)} batch={','.join(str(b) for _, b in answers)}"
        return {
            "model_id": predictor.model_id, "backend": predictor.backend, "top_k": top_k,
            "predictions": [{"file": name, "top": top_classes(probs, classes, top_k), "batch_size": size}
                            for (name, _), (probs, size) in zip(files, answers)],
            "time_ms": {"read": _ms(read_done - start), "decode": _ms(decode_done - read_done),
                        "model": _ms(done - decode_done), "total": _ms(done - start)},
        }

    return app


def _prepare_all(predictor: Any, files: list[tuple[str, bytes]], limits: Limits) -> list[Any]:
    """Decode and preprocess every upload; the first bad one refuses the whole request by name."""
    arrays = []
    for name, data in files:
        image = decode_image(data, name, limits)
        try:
            arrays.append(predictor.preprocess(image))
        except Exception as e:  # noqa: BLE001 - a decodable image the preprocessing still rejects
            raise BadInput(422, "unusable_image", f"{name} could not be prepared for the model: {e}") from None
    return arrays


def parse_top_k(value: str | None, num_classes: int) -> int:
    """``?top_k=`` as an int in ``1..num_classes`` (default 5, larger values are clipped)."""
    if value is None or value == "":
        return min(5, num_classes)
    if not value.isdigit() or int(value) < 1:
        raise BadInput(400, "bad_top_k", f"top_k must be a positive whole number, got {value!r}")
    return min(int(value), num_classes)


def top_classes(probs: Any, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first."""
    order = probs.argsort()[::-1][:k]
    return [{"class": classes[i], "probability": round(float(probs[i]), 6)} for i in order]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def model_card_text(source: str | Path, predictor: Any) -> str:
    """The model card to show: the predictor's own (an export's README.md), else one from its metadata."""
    card = predictor.metadata.get("card")
    if card:
        return str(card)
    path = Path(source)
    if path.is_dir() and (path / "README.md").is_file():
        return (path / "README.md").read_text(encoding="utf-8", errors="replace")
    meta = dict(predictor.metadata)
    lines = [f"# {predictor.model_id}", "", f"- backend: {predictor.backend}",
             f"- classes ({len(predictor.classes)}): {', '.join(map(str, predictor.classes))}"]
    for key in ("arch", "source", "weights", "metrics"):
        if meta.get(key) is not None:
            lines.append(f"- {key}: {json.dumps(meta[key], default=str)}")
    return "\n".join(lines) + "\n"


def serve(predictor: Any, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_wait_ms: float = 5.0, max_queue: int = 256, limits: Limits | None = None, model_card: str = "",
          max_requests: int | None = None, stop_after_s: float | None = None) -> int:
    """Run the server until SIGTERM/SIGINT (or ``max_requests`` answered, or ``stop_after_s``); return 0.

    The socket is bound here, before uvicorn starts, so ``port=0`` picks a free port that is
    printed on stdout (``listening on http://HOST:PORT``) for scripts and tests to read.
    """
    import uvicorn

    sock = _bind(host, port)
    _configure_logging()
    app = create_app(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                     limits=limits, model_card=model_card)
    config = uvicorn.Config(app, log_config=None, access_log=False, limit_max_requests=max_requests,
                            timeout_graceful_shutdown=10, server_header=False)
    server = uvicorn.Server(config)
    if stop_after_s:
        timer = threading.Timer(stop_after_s, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    print(f"listening on http://{_url_host(host)}:{sock.getsockname()[1]}", flush=True)
    with _graceful_signals():
        server.run(sockets=[sock])
    log.info("stopped")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or a HeadstartError saying why not."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HeadstartError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                             f"(0 takes a free one) or --host") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _graceful_signals:
    """Make SIGTERM and SIGINT a clean exit 0 once uvicorn has shut down gracefully.

    uvicorn catches both signals, drains its connections, then re-raises the signal against the
    handler that was installed before it; with Python's defaults that would end the process with
    -15 (SIGTERM) or a KeyboardInterrupt (SIGINT). A recording handler turns them into a return.
    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> None:
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._note) for s in self.SIGNALS}

    def _note(self, signum: int, _frame: Any) -> None:
        log.info("received %s, shut down", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def _configure_logging() -> None:
    """Server and uvicorn messages to stderr, one line each (uvicorn's own config is turned off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("headstart.serve", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


__all__ = ["Limits", "create_app", "model_card_text", "parse_top_k", "serve", "top_classes"]
