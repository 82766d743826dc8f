"""Benchmark (issue 11): ``headstart serve`` under load, torch vs ONNX Runtime backends.

Two real servers (``headstart serve``, uvicorn on loopback) serve the same checkpoint:
torchvision's MobileNetV2 with its real ``IMAGENET1K_V1`` weights and ImageNet classifier, one
with ``--backend torch``, one with ``--backend onnx`` (converted at start-up and verified against
PyTorch by the runtime). Clients post real photos from ``../shared/data/imagenet-samples.tar.gz``
(one per ImageNet class, shorter side 256 px) as raw bodies, ``C`` at a time (1, 8 and 32), each
sending its next request as soon as its last is answered.

- Contenders are (backend, clients) pairs, run in rounds; in every round each concurrency runs
  both backends back to back, in alternating order (A B, then B A), so drift hits both alike.
- Each run is bounded in requests (``--requests``, scaled with the client count) and in seconds
  (``--seconds``); servers stop by themselves (``--stop-after``) if this script dies.
- Result lines (stdout, one JSON each): one per contender with requests/s, p50/p99 latency (ms,
  medians over rounds for rates, pooled samples for percentiles), errors, the mean batch size the
  server ran (from ``/health``) and the top-1 agreement of its answers with the images' ImageNet
  labels (a check that the served answers are right); then one for 1,000 malformed requests per
  server (0 crashes: no 5xx, no dropped connection, ``/health`` still answers, a real photo is
  still classified the same); then a summary with the onnx/torch ratios.

    python bench/serve.py            # 2 rounds, up to 40 + 8 per client requests per run
    python bench/serve.py --quick    # 1 round, fewer requests, 200 malformed

The client (httpx on asyncio) shares the two CPU cores with the server; its cost is part of every
number, as it would be for any client on the same machine.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "serve"
TARBALL = "imagenet-samples.tar.gz"
CLIENTS = (1, 8, 32)
UPLOAD_MB = 2


def parse_args() -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=40, help="requests per run at 1 client (plus 8 per client)")
    p.add_argument("--seconds", type=float, default=30.0, help="time bound of one run")
    p.add_argument("--malformed", type=int, default=1000, help="malformed requests per server")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.requests, args.seconds, args.malformed = 1, 16, 15.0, 200
    return args


# ---------------------------------------------------------------------- data and model


def photos(args: Any) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """64 real JPEGs (name, bytes), evenly spread over the 1,000 classes, and every file's class index."""
    tarball = Path(args.data_dir).expanduser() / TARBALL
    if not tarball.is_file():
        common.skip(BENCH, f"{tarball} not found (real data lives in ../shared/data; pass --data-dir)")
    root = Path(args.work_dir).expanduser() / "imagenet-samples"
    if not (root / "labels.csv").is_file():
        common.log(f"unpacking {tarball}")
        with tarfile.open(tarball) as tf:
            tf.extractall(root.parent, filter="data")
    with (root / "labels.csv").open() as f:
        # by index: labels.csv spells names its own way (Gila_monster, torchvision: Gila monster)
        labels = {row["file"]: int(row["class_index"]) for row in csv.DictReader(f)}
    files = sorted(labels)[:: len(labels) // 64][:64]
    return [(name, (root / name).read_bytes()) for name in files], labels


def make_checkpoint(work: Path) -> Path:
    """MobileNetV2 with its real ImageNet weights and classifier, saved as a headstart checkpoint."""
    import torch

    import headstart as hs
    from headstart.models import model_record

    path = work / "mobilenet_v2-imagenet1k.pt"
    if not path.is_file():
        net = hs.build_network("mobilenet_v2", "IMAGENET1K_V1")  # keeps the 1,000-class classifier
        work.mkdir(parents=True, exist_ok=True)
        torch.save(model_record(net, list(net.preprocessing.categories)), path)
    return path


# ---------------------------------------------------------------------- servers


def serve_entry() -> list[str]:
    """``-m headstart serve`` once the CLI has the command, else the command's own module."""
    import contextlib

    from headstart.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["serve", "x"])
        return ["-m", "headstart", "serve"]
    except SystemExit:
        return ["-m", "headstart.deploy.serve_cli"]


class Server:
    """One ``headstart serve`` subprocess on a free loopback port (bounded by ``--stop-after``)."""

    def __init__(self, ckpt: Path, backend: str, args: Any, log_path: Path) -> None:
        src = str(common.REPO / "src")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, *serve_entry(), str(ckpt), "--backend", backend, "--port", "0",
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--max-upload-mb", str(UPLOAD_MB), "--stop-after", "3600"]
        self.backend, self.log_path = backend, log_path
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        line = self.proc.stdout.readline()  # blocks until "listening on URL" (or the process ends)
        if not line.startswith("listening on "):
            raise SystemExit(f"the {backend} server did not start:\n{log_path.read_text()[-3000:]}")
        self.url = line.split()[-1]
        self.address = (self.url.split("//")[1].rsplit(":", 1)[0], int(self.url.rsplit(":", 1)[1]))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        self.proc.terminate()  # SIGTERM: uvicorn's graceful shutdown
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


async def wait_healthy(client: Any, url: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = await client.get(url + "/health")
            if r.status_code == 200:
                return r.json()
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------- load


async def load_run(client: Any, server: Server, images: list[tuple[str, bytes]], labels: dict[str, str],
                   clients: int, count: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent loops posting photos until ``count`` answers or ``seconds`` passed."""
    before = (await client.get(server.url + "/health")).json()["batching"]
    latencies: list[float] = []
    errors, correct, sent = 0, 0, 0
    deadline = time.monotonic() + seconds

    async def loop(worker: int) -> None:
        nonlocal errors, correct, sent
        while sent < count and time.monotonic() < deadline:
            name, data = images[(worker * 7 + sent) % len(images)]
            sent += 1
            start = time.perf_counter()
            try:
                r = await client.post(server.url + "/predict?top_k=1", content=data,
                                      headers={"content-type": "image/jpeg"})
                ok = r.status_code == 200
            except Exception:  # noqa: BLE001 - a dropped connection is an error to count
                ok = False
            latencies.append(time.perf_counter() - start)
            if not ok:
                errors += 1
            elif r.json()["predictions"][0]["top"][0]["class"] == labels[name]:
                correct += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(clients)))
    wall = time.perf_counter() - start
    after = (await client.get(server.url + "/health")).json()["batching"]
    batches = after["batches"] - before["batches"]
    return {"requests": len(latencies), "errors": errors, "seconds": wall, "latencies": latencies,
            "correct": correct, "mean_batch": (after["images"] - before["images"]) / batches if batches else 0.0}


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")


# ---------------------------------------------------------------------- malformed requests


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def malformed_kinds(photo: bytes) -> dict[str, dict[str, Any]]:
    """httpx keyword arguments for each kind of bad request."""
    return {
        "zero-byte": dict(content=b""),
        "text": dict(content=b"not an image at all\n" * 20),
        "truncated jpeg": dict(content=photo[: len(photo) // 3]),
        "corrupt jpeg": dict(content=photo[:200] + bytes(range(256)) * 8),
        "bomb header": dict(content=png_claiming(30_000, 30_000)),
        "too many pixels": dict(content=png_claiming(9_000, 9_000)),
        "oversized": dict(content=b"\0" * (UPLOAD_MB * 2**20 + 4096)),
        "multipart, no file": dict(content=b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n--b--\r\n',
                                   headers={"content-type": "multipart/form-data; boundary=b"}),
        "bad multipart": dict(content=b"garbage", headers={"content-type": "multipart/form-data"}),
        "bad top_k": dict(content=photo, params={"top_k": "-3"}),
    }


def raw_abuse(server: Server, kind: int) -> None:
    """Requests no HTTP client library sends: junk bytes, or an upload dropped half-way."""
    with socket.create_connection(server.address, timeout=10) as s:
        if kind == 0:
            s.sendall(b"\x16\x03\x01\x02\x00 this is not HTTP\r\n\r\n")
            s.recv(100)
        else:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n" + b"\xff\xd8" * 500)


async def malformed_run(client: Any, server: Server, photo: bytes, total: int) -> dict[str, Any]:
    """``total`` bad requests, 16 at a time; counts answers by status and anything that is not a 4xx."""
    kinds = malformed_kinds(photo)
    names = list(kinds) + ["raw junk", "dropped upload"]
    statuses: dict[str, int] = {}
    failures: list[str] = []
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            name = names[i % len(names)]
            try:
                if name in kinds:
                    r = await client.post(server.url + "/predict", **kinds[name])
                    statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                    if not 400 <= r.status_code < 500 or "error" not in r.json():
                        failures.append(f"{name}: {r.status_code}")
                else:
                    await asyncio.to_thread(raw_abuse, server, names.index(name) - len(kinds))
                    statuses["raw"] = statuses.get("raw", 0) + 1
            except Exception as e:  # noqa: BLE001 - a dropped connection is a failure
                failures.append(f"{name}: {type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    seconds = time.perf_counter() - start
    health = await client.get(server.url + "/health")
    after = await client.post(server.url + "/predict?top_k=1", content=photo)
    return {"malformed": total, "seconds": round(seconds, 1), "statuses": dict(sorted(statuses.items())),
            "failures": len(failures), "first_failures": failures[:5], "server_alive": server.alive(),
            "health_after": health.status_code, "predict_after": after.status_code,
            "class_after": after.json()["predictions"][0]["top"][0]["class"] if after.status_code == 200 else None}


# ---------------------------------------------------------------------- main


async def bench(args: Any, servers: dict[str, Server], images: list, labels: dict[str, int]) -> None:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for s in servers.values():
            health = await wait_healthy(client, s.url)
            common.log(f"{s.backend} server ready: {health['model_id']} at {s.url}")
        classes = (await client.get(next(iter(servers.values())).url + "/metadata")).json()["classes"]
        truth = {name: classes[i] for name, i in labels.items()}
        for s in servers.values():
            await load_run(client, s, images, truth, 2, 8, 30)  # warm-up: first batches are slow
        runs: dict[tuple[str, int], list[dict]] = {}
        order = list(servers)
        for rnd in range(args.rounds):
            for c in CLIENTS:
                for backend in order if (rnd + CLIENTS.index(c)) % 2 == 0 else order[::-1]:
                    count = args.requests + 8 * c
                    r = await load_run(client, servers[backend], images, truth, c, count, args.seconds)
                    runs.setdefault((backend, c), []).append(r)
                    common.log(f"round {rnd + 1} {backend:5s} {c:2d} clients: {r['requests']} requests, "
                               f"{r['requests'] / r['seconds']:.1f}/s, {r['errors']} errors, "
                               f"mean batch {r['mean_batch']:.1f}")
        summary = report(runs, args)
        photo = images[0][1]
        for backend, s in servers.items():
            m = await malformed_run(client, s, photo, args.malformed)
            common.log(f"{backend}: {m['malformed']} malformed in {m['seconds']} s, {m['failures']} failures")
            common.emit({"benchmark": BENCH, "contender": f"{backend} malformed", **m})
            summary[f"{backend}_malformed_failures"] = m["failures"]
            summary[f"{backend}_alive_after_malformed"] = m["server_alive"] and m["health_after"] == 200
    summary["machine"] = common.machine_info()
    common.emit(summary)


def report(runs: dict[tuple[str, int], list[dict]], args: Any) -> dict[str, Any]:
    """Emit one line per contender; return the summary with onnx/torch ratios."""
    summary: dict[str, Any] = {"benchmark": BENCH, "contender": "summary", "rounds": args.rounds,
                               "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}
    rates: dict[tuple[str, int], float] = {}
    for (backend, c), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lat = [x for r in rs for x in r["latencies"]]
        n = sum(r["requests"] for r in rs)
        rates[backend, c] = common.median([r["requests"] / r["seconds"] for r in rs])
        line = {"benchmark": BENCH, "contender": f"{backend} x{c}", "backend": backend, "clients": c,
                "requests": n, "errors": sum(r["errors"] for r in rs),
                "requests_per_s": round(rates[backend, c], 2), "p50_ms": round(percentile(lat, 50), 1),
                "p99_ms": round(percentile(lat, 99), 1), "max_ms": round(percentile(lat, 100), 1),
                "mean_batch": round(float(np.mean([r["mean_batch"] for r in rs])), 2),
                "top1_vs_labels": round(sum(r["correct"] for r in rs) / max(1, n - sum(r["errors"] for r in rs)), 3)}
        common.emit(line)
        summary[f"{backend}_x{c}_errors"] = line["errors"]
        summary[f"{backend}_x{c}_p99_ms"] = line["p99_ms"]
    for c in CLIENTS:
        if ("onnx", c) in rates and ("torch", c) in rates:
            summary[f"onnx_over_torch_rps_x{c}"] = round(common.ratio(rates["onnx", c], rates["torch", c]), 2)
    return summary


def main() -> None:
    args = parse_args()
    images, labels = photos(args)
    work = Path(args.work_dir).expanduser() / "serve"
    ckpt = make_checkpoint(work)
    common.log(f"checkpoint {ckpt}; {len(images)} photos; starting torch and onnx servers")
    servers: dict[str, Server] = {}
    try:
        for backend in ("torch", "onnx"):
            servers[backend] = Server(ckpt, backend, args, work / f"{backend}.log")
        asyncio.run(bench(args, servers, images, labels))
    finally:
        for backend, s in servers.items():
            rc = s.stop()
            common.log(f"{backend} server stopped on SIGTERM with exit status {rc}")


if __name__ == "__main__":
    main()
