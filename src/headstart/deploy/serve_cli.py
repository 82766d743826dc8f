"""The ``headstart serve`` command: its flags and what running it does.

``add_serve_parser(subparsers)`` adds the subcommand to the main CLI; ``run_serve(args)`` runs it.
``python -m headstart.deploy.serve_cli ARGS`` runs the same command on its own.

    headstart serve runs/my-run --port 8000 --max-batch 16 --max-wait-ms 5
    curl -F file=@cat.jpg -F file=@dog.jpg 'http://127.0.0.1:8000/predict?top_k=3'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import HeadstartError
from .uploads import Limits

DEFAULTS = Limits()


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to an ``argparse`` subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP: POST /predict, GET /health, /metadata, and a web page at /",
        description="Serve a trained model over HTTP (FastAPI on uvicorn). Concurrent requests are "
                    "micro-batched; bad uploads get a 4xx JSON answer; SIGTERM or Ctrl-C stops it cleanly.")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT_OR_EXPORT",
                   help="a run folder, a .pt checkpoint or a folder written by `headstart export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; "
                                                        "0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0 picks a free one)")
    p.add_argument("--backend", choices=["torch", "onnx", "torchscript"], default=None,
                   help="inference engine (default: the export's own format, torch for a checkpoint; "
                        "onnx or torchscript on a checkpoint converts and verifies it in memory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default %(default)s)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="most images in one forward pass (default %(default)s; 1 turns batching off)")
    g.add_argument("--max-wait-ms", type=float, default=5.0, metavar="M",
                   help="how long the first image of a batch waits for others (default %(default)s)")
    g.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="images waiting for the model before new requests get 503 (default %(default)s)")
    g = p.add_argument_group("limits on what one request may send")
    g.add_argument("--max-upload-mb", type=float, default=DEFAULTS.max_upload_bytes / 2**20, metavar="MB",
                   help="request body size (default %(default)g; larger uploads get 413 while being read)")
    g.add_argument("--max-images", type=int, default=DEFAULTS.max_images, metavar="N",
                   help="images per request (default %(default)s)")
    g.add_argument("--max-pixels", type=int, default=DEFAULTS.max_pixels, metavar="N",
                   help="width x height of one image, checked before decoding (default %(default)s)")
    g.add_argument("--read-timeout", type=float, default=DEFAULTS.read_timeout_s, metavar="S",
                   help="seconds a client may take to send its upload (default %(default)g)")
    g = p.add_argument_group("bounded runs (tests, benchmarks, demos)")
    g.add_argument("--max-requests", type=int, default=None, metavar="N",
                   help="stop after answering N requests")
    g.add_argument("--stop-after", type=float, default=None, metavar="S", help="stop after S seconds")
    p.set_defaults(func=run_serve)
    return p


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The upload limits the flags ask for, checked."""
    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-images", args.max_images),
                        ("--max-pixels", args.max_pixels), ("--read-timeout", args.read_timeout),
                        ("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value <= 0:
            raise HeadstartError(f"{flag} must be positive, got {value}")
    if args.max_wait_ms < 0:
        raise HeadstartError(f"--max-wait-ms must not be negative, got {args.max_wait_ms}")
    return Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_images=args.max_images,
                  max_pixels=args.max_pixels, read_timeout_s=args.read_timeout)


def run_serve(args: argparse.Namespace) -> int:
    """Open the model, then serve it until stopped; returns the exit status (0 after a clean stop)."""
    from .runtime import open_predictor
    from .serve import model_card_text, serve

    limits = limits_from_args(args)
    predictor = open_predictor(args.source, backend=args.backend, device=args.device)
    return serve(predictor, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, limits=limits,
                 model_card=model_card_text(args.source, predictor), max_requests=args.max_requests,
                 stop_after_s=args.stop_after)


def main(argv: Sequence[str] | None = None) -> int:
    """``serve`` on its own: the same flags and exit statuses as ``headstart serve``."""
    parser = argparse.ArgumentParser(prog="headstart")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_serve(args)
    except HeadstartError as e:
        print(f"headstart: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
