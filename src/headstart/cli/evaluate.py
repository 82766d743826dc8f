"""``headstart eval``, ``predict`` and ``report``: what a trained model does on images."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from headstart.errors import HeadstartError


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="evaluate a checkpoint: top-1/5, per-class scores, confusion matrix")
    e.add_argument("checkpoint", help="a .pt checkpoint, a run folder or an export folder")
    e.add_argument("--data", required=True, help="digits, cifar10, cifar100 or an image folder")
    e.add_argument("--split", choices=["auto", "val", "train", "all"], default="auto",
                   help="which images: auto = the val split, or all images of a plain class folder")
    e.add_argument("--batch-size", type=int, default=64, help="images per batch")
    e.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--strict", action="store_true", help="unreadable images are an error")
    e.add_argument("--output", help="write the report (JSON) and confusion matrix (CSV) to this folder "
                                    "(default: eval/ beside the checkpoint)")
    return e


def run_eval(args: argparse.Namespace) -> int:
    from headstart.deploy.commands import evaluate_export, is_export
    from headstart.evaluation.metrics import format_report
    from headstart.jobs.evaluate import evaluate_checkpoint

    if args.batch_size < 1:
        raise HeadstartError(f"--batch-size must be 1 or more, got {args.batch_size}")
    run = evaluate_export if is_export(args.checkpoint) else evaluate_checkpoint
    report = run(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                 tta=args.tta, device=args.device, strict=args.strict)
    print(format_report(report))
    out = Path(args.output) if args.output else _default_eval_dir(args.checkpoint)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report.to_dict(), indent=2))
        with (out / "confusion_matrix.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *report.classes])
            for c, row in zip(report.classes, report.confusion.tolist()):
                w.writerow([c, *row])
    except OSError as e:
        raise HeadstartError(f"cannot write the evaluation to {out}: {e.strerror or e}; "
                             "give --output a writable folder") from None
    print(f"\nsaved {out / 'eval.json'} and {out / 'confusion_matrix.csv'}")
    return 0


def _default_eval_dir(ckpt: str) -> Path:
    p = Path(ckpt)
    return (p if p.is_dir() else p.parent) / "eval"


def add_predict_parser(sub: Any) -> argparse.ArgumentParser:
    pr = sub.add_parser("predict", help="classify image files or folders with a checkpoint")
    pr.add_argument("checkpoint", help="a .pt checkpoint, a run folder or an export folder")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    pr.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    pr.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pr.add_argument("--strict", action="store_true", help="an unreadable image is an error (default: skipped, listed)")
    return pr


def run_predict(args: argparse.Namespace) -> int:
    from headstart.deploy.commands import is_export, predict_export
    from headstart.jobs.predict import Predictions, predict

    if is_export(args.checkpoint):
        results = Predictions(predict_export(args.checkpoint, args.inputs, top_k=args.top_k, device=args.device))
    else:
        results = predict(args.checkpoint, args.inputs, top_k=args.top_k, device=args.device, strict=args.strict)
    for file, why in results.unreadable:
        print(f"headstart: skipped: {why if file in why else f'{file}: {why}'}", file=sys.stderr)
    if results.unreadable:
        print(f"headstart: {len(results.unreadable)} unreadable image(s) skipped, {len(results)} predicted",
              file=sys.stderr)
    print({"json": _json, "csv": _csv, "table": _table}[args.format](results), end="")
    return 0


def _json(results: list[dict[str, Any]]) -> str:
    return json.dumps(list(results), indent=2) + "\n"


def _csv(results: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "rank", "class", "probability"])
    for r in results:
        for k, t in enumerate(r["top"], 1):
            w.writerow([r["file"], k, t["class"], f"{t['probability']:.6f}"])
    return buf.getvalue()


def _table(results: list[dict[str, Any]]) -> str:
    """One row per image under a header: the file, then its top classes with probabilities."""
    cells = [[r["file"], *(f"{t['class']} {t['probability']:.1%}" for t in r["top"])] for r in results]
    header = ["file", *(f"top-{k}" for k in range(1, max((len(c) for c in cells), default=1)))]
    widths = [max(len(row[i]) for row in [header, *cells] if i < len(row)) for i in range(len(header))]
    return "".join("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)).rstrip() + "\n" for row in [header, *cells])


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    r = sub.add_parser("report", help="write a run's HTML report (curves, confusion matrix, mistakes)")
    r.add_argument("run_dir")
    r.add_argument("--data", help="evaluate on this data source instead of the run's validation split")
    return r


def run_report(args: argparse.Namespace) -> int:
    from headstart.report import write_report

    print(f"report written to {write_report(args.run_dir, data_source=args.data)}")
    return 0
