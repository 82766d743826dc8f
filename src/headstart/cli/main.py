"""The ``headstart`` command line: ``build_parser()``, ``main(argv) -> int``, ``entrypoint()``.

Every training flag is a dotted key of :class:`~headstart.config.RunConfig` (the table
``TRAIN_FLAGS`` below), so the CLI and the Python API share one config: ``--config run.yaml`` sets
it, flags override it, and ``--set key=value`` reaches any field without a dedicated flag.
User mistakes exit with status 2 and a one-line message (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headstart.config import RunConfig, apply_overrides, load_yaml
from headstart.errors import HeadstartError
from headstart.version import __version__


def _yes_no_auto(value: str) -> bool | None:
    v = value.strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    if v == "auto":
        return None
    raise argparse.ArgumentTypeError(f"expected yes, no or auto, got {value!r}")


# flag, config key, argparse options, help
TRAIN_FLAGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("--model", "model.name", {}, "backbone name (see `headstart models`)"),
    ("--weights", "model.weights", {}, "DEFAULT, a weights name (IMAGENET1K_V1), none, or a file path"),
    ("--input-size", "model.input_size", {"type": int}, "square input size in pixels (default: the weights')"),
    ("--head", "head.kind", {"choices": ["replace", "linear", "mlp"]}, "new classifier: replace the final layer, "
     "one linear layer, or an MLP"),
    ("--hidden", "head.hidden", {}, "hidden sizes of an mlp head, comma-separated (512,256)"),
    ("--dropout", "head.dropout", {"type": float}, "dropout in a linear/mlp head"),
    ("--activation", "head.activation", {}, "activation of an mlp head (relu, gelu, silu, tanh)"),
    ("--head-batchnorm", "head.batchnorm", {"action": "store_const", "const": True}, "batch norm in an mlp head"),
    ("--data", "data.source", {}, "digits, cifar10, cifar100, or an image folder"),
    ("--data-root", "data.root", {}, "cache folder for downloadable datasets"),
    ("--val-split", "data.val_split", {"type": float}, "held-out fraction when the data has no val split"),
    ("--batch-size", "data.batch_size", {"type": int}, "images per batch"),
    ("--workers", "data.workers", {"type": int}, "data loading processes (default: chosen for the data)"),
    ("--no-augment", "data.augment", {"action": "store_const", "const": False}, "turn train-time augmentation off"),
    ("--strict", "data.strict", {"action": "store_const", "const": True}, "unreadable images are an error"),
    ("--in-memory", "data.in_memory", {"type": _yes_no_auto},
     "decode image files once and keep them in memory: yes, no or auto (when they fit data.memory_gb)"),
    ("--batch-transforms", "data.batch_transforms", {"type": _yes_no_auto},
     "crop, flip and normalise in-memory images per batch on the device: yes, no or auto (on CUDA)"),
    ("--limit-train", "data.limit_train", {"type": int}, "use at most N training images"),
    ("--limit-val", "data.limit_val", {"type": int}, "use at most N validation images"),
    ("--freeze", "train.freeze", {}, "what the head stage freezes: body, none, K (first K groups) or patterns"),
    ("--epochs", "train.epochs", {"type": int}, "epochs of the head stage"),
    ("--lr", "train.lr", {"type": lambda v: v if v == "auto" else float(v)},
     "learning rate of the head stage, or auto (learning-rate range test)"),
    ("--optimizer", "train.optimizer", {"choices": ["adamw", "sgd"]}, "optimizer"),
    ("--weight-decay", "train.weight_decay", {"type": float}, "weight decay (never on biases and norms)"),
    ("--warmup", "train.warmup", {"type": float}, "fraction of each stage's steps spent warming up"),
    ("--scheduler", "train.scheduler", {"choices": ["cosine", "onecycle", "constant"]}, "learning-rate schedule"),
    ("--label-smoothing", "train.label_smoothing", {"type": float}, "label smoothing of the loss"),
    ("--finetune-epochs", "train.finetune_epochs", {"type": int}, "epochs of the fine-tuning stage (0: none)"),
    ("--finetune-unfreeze", "train.finetune_unfreeze", {}, "`all` or how many last depth groups fine-tuning unfreezes"),
    ("--finetune-lr", "train.finetune_lr", {"type": lambda v: v if v == "auto" else float(v)},
     "base learning rate of fine-tuning, or auto"),
    ("--layer-decay", "train.layer_decay", {"type": float}, "per-group learning-rate decay in fine-tuning"),
    ("--schedule", "train.schedule", {"choices": ["two-phase", "gradual"]},
     "the seed's two phases or gradual unfreezing"),
    ("--patience", "train.patience", {"type": int}, "stop a stage after N epochs without improvement"),
    ("--checkpoint-minutes", "train.checkpoint_minutes", {"type": float}, "mid-epoch last.pt every N minutes (0: off)"),
    ("--seed", "train.seed", {"type": int}, "random seed (a CPU run repeats exactly)"),
    ("--device", "train.device", {}, "auto, cpu, cuda or cuda:N"),
    ("--no-progress", "train.progress", {"action": "store_const", "const": False}, "no progress bars"),
    ("--finetune-bn", "train.finetune_bn", {"choices": ["frozen", "train", "eval-all"]},
     "BatchNorm while fine-tuning (eval-all keeps pretrained statistics)"),
    ("--no-cache", "cache.enabled", {"action": "store_const", "const": False},
     "run the frozen body every epoch instead of caching its features"),
    ("--cache-views", "cache.views", {"type": int}, "cached views per image (1: plain; more: augmented copies)"),
    ("--cache-dir", "cache.dir", {}, "feature cache folder"),
    ("--no-tensorboard", "tensorboard", {"action": "store_const", "const": False}, "no TensorBoard event files"),
    ("--no-report", "report", {"action": "store_const", "const": False}, "skip the HTML report at the end"),
    ("--output", "output", {}, "folder for run folders"),
    ("--name", "name", {}, "run folder name (default: time, model and data)"),
]


# What may differ when a run resumes: where it runs, how it shows progress, how often it saves.
RESUME_FLAGS = {"train.device", "train.progress", "train.checkpoint_minutes"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headstart", description="Transfer learning of image classifiers on PyTorch.")
    p.add_argument("--version", action="version", version=f"headstart {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("models", help="list backbones with parameter counts and input sizes")
    m.add_argument("pattern", nargs="?", default="*", help="glob or substring (resnet*, vit)")

    i = sub.add_parser("inspect", help="show a model's body, head, depth groups and training plan")
    i.add_argument("model")
    i.add_argument("--num-classes", type=int, help="replace the head for N classes")
    i.add_argument("--config", help="YAML run config whose schedule is shown")
    _add_train_flags(i, skip={"--model", "--data", "--data-root", "--output", "--name"})

    t = sub.add_parser("train", help="train a classifier (no flags: the embedded digits demo)")
    t.add_argument("--config", help="YAML run config; flags override it")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    _add_train_flags(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint: top-1/5, per-class scores, confusion matrix")
    e.add_argument("checkpoint", help="a .pt checkpoint or a run folder")
    e.add_argument("--data", required=True, help="digits, cifar10, cifar100 or an image folder")
    e.add_argument("--split", choices=["auto", "val", "train", "all"], default="auto",
                   help="which images: auto = the val split, or all images of a plain class folder")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    e.add_argument("--device", default="auto")
    e.add_argument("--strict", action="store_true", help="unreadable images are an error")
    e.add_argument("--output", help="write the report (JSON) and confusion matrix (CSV) to this folder")

    pr = sub.add_parser("predict", help="classify image files or folders with a checkpoint")
    pr.add_argument("checkpoint")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--format", choices=["table", "json", "csv"], default="table")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--strict", action="store_true", help="an unreadable image is an error (default: skip it, list it)")

    w = sub.add_parser("weights", help="manage pretrained weights files for offline use")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    wi = wsub.add_parser("import", help="check a downloaded file's hash and install it where torchvision looks")
    wi.add_argument("file")
    wi.add_argument("--force", action="store_true", help="replace a different file already installed")
    wsub.add_parser("where", help="print the folder torchvision loads weights from")

    lf = sub.add_parser("lr-find", help="learning-rate range test for a stage; saves the plot, suggests a rate")
    lf.add_argument("--config", help="YAML run config; flags override it")
    lf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    lf.add_argument("--stage", type=int, default=1, help="which stage of the schedule (1 = the head stage)")
    lf.add_argument("--steps", type=int, default=100, help="number of steps of the test")
    lf.add_argument("--plot", default="lr_find.png", help="where to save the plot (PNG)")
    _add_train_flags(lf, skip={"--output", "--name"})

    r = sub.add_parser("report", help="write a run's HTML report (curves, confusion matrix, mistakes)")
    r.add_argument("run_dir")
    r.add_argument("--data", help="evaluate on this data source instead of the run's validation split")

    c = sub.add_parser("cache", help="show or remove cached features")
    c.add_argument("action", choices=["info", "clear"])
    c.add_argument("--dir", help="cache folder (default: $HEADSTART_CACHE or ~/.cache/headstart/features)")

    # Commands defined beside what they run: each module gives add_*_parser(sub) and run_*(args).
    from headstart.deploy.commands import add_export_parser
    from headstart.deploy.serve_cli import add_serve_parser

    add_export_parser(sub)
    add_serve_parser(sub)
    return p


def _add_train_flags(p: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    g = p.add_argument_group("run config (each flag sets the config key in brackets)")
    for flag, key, opts, help_ in TRAIN_FLAGS:
        if flag not in skip:
            g.add_argument(flag, dest=key, default=None, help=f"{help_} [{key}]", **opts)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run config: defaults, then ``--config``, then flags, then ``--set`` overrides."""
    cfg = load_yaml(args.config) if getattr(args, "config", None) else RunConfig()
    overrides = {key: getattr(args, key) for _, key, _, _ in TRAIN_FLAGS if getattr(args, key, None) is not None}
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise HeadstartError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    return apply_overrides(cfg, overrides)


# ---------------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from headstart.models.backbones import list_backbones

    rows = list_backbones(args.pattern)
    if not rows:
        raise HeadstartError(f"no model matches {args.pattern!r}; run `headstart models` for the full list")
    width = max(24, *(len(r.name) for r in rows))
    print(f"{'model':<{width}} {'parameters':>14}  {'input':>5}  {'source':<12} {'offline':<7}  weights")
    for r in rows:
        params = f"{r.params:,}" if r.params else "?"
        offline = "yes" if r.offline else "-"
        print(f"{r.name:<{width}} {params:>14}  {r.input_size:>5}  {r.source:<12} {offline:<7}  {', '.join(r.weights)}")
    here = sum(r.offline for r in rows)
    print(f"\n{len(rows)} model(s); {here} with pretrained weights on this machine (offline: yes)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from headstart.jobs.describe import inspect_model

    args.__dict__["model.name"] = args.model
    cfg = resolve_config(args)
    if cfg.model.weights == RunConfig().model.weights and getattr(args, "model.weights") is None:
        cfg.model.weights = "none"  # structure needs no download; --weights loads real ones
    print(inspect_model(cfg, num_classes=args.num_classes))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from headstart.jobs.train import train

    if args.resume:
        given = {key for _, key, _, _ in TRAIN_FLAGS if getattr(args, key, None) is not None}
        extra = given - RESUME_FLAGS or ({"--config"} if args.config else set()) or set(args.set)
        if extra:
            raise HeadstartError(f"--resume continues the run's saved config; only --device, --no-progress and "
                                 f"--checkpoint-minutes may change (got {', '.join(sorted(extra))})")
        train(RunConfig(), resume=args.resume, overrides={k: getattr(args, k) for k in given})
    else:
        train(resolve_config(args))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from headstart.deploy.commands import evaluate_export, is_export
    from headstart.evaluation.metrics import format_report
    from headstart.jobs.evaluate import evaluate_checkpoint

    run = evaluate_export if is_export(args.checkpoint) else evaluate_checkpoint
    report = run(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                 tta=args.tta, device=args.device, strict=args.strict)
    print(format_report(report))
    out = Path(args.output) if args.output else _default_eval_dir(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report.to_dict(), indent=2))
    with (out / "confusion_matrix.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *report.classes])
        for c, row in zip(report.classes, report.confusion.tolist()):
            w.writerow([c, *row])
    print(f"\nsaved {out / 'eval.json'} and {out / 'confusion_matrix.csv'}")
    return 0


def _default_eval_dir(ckpt: str) -> Path:
    p = Path(ckpt)
    return (p if p.is_dir() else p.parent) / "eval"


def cmd_predict(args: argparse.Namespace) -> int:
    from headstart.deploy.commands import is_export, predict_export
    from headstart.jobs.predict import Predictions, predict

    if is_export(args.checkpoint):
        results = Predictions(predict_export(args.checkpoint, args.inputs, top_k=args.top_k, device=args.device))
    else:
        results = predict(args.checkpoint, args.inputs, top_k=args.top_k, device=args.device, strict=args.strict)
    for _, why in results.unreadable:
        print(f"headstart: skipped: {why}", file=sys.stderr)
    if results.unreadable:
        print(f"headstart: {len(results.unreadable)} unreadable image(s) skipped, {len(results)} predicted",
              file=sys.stderr)
    if args.format == "json":
        print(json.dumps(results, indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "rank", "class", "probability"])
        for r in results:
            for k, t in enumerate(r["top"], 1):
                w.writerow([r["file"], k, t["class"], f"{t['probability']:.6f}"])
        print(buf.getvalue(), end="")
    else:
        width = max(len("file"), *(len(r["file"]) for r in results))
        print(f"{'file':<{width}}  top classes (probability)")
        for r in results:
            tops = "  ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"])
            print(f"{r['file']:<{width}}  {tops}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from headstart.models.weights import hub_checkpoint_dir, import_weights_file

    if args.weights_command == "where":
        print(hub_checkpoint_dir())
        return 0
    path, member = import_weights_file(args.file, force=args.force)
    model = member.url.rsplit("/", 1)[-1]
    print(f"installed {path}\n  = torchvision {type(member).__name__}.{member.name} ({model}); "
          f"--weights {member.name} (or DEFAULT where it is the default) now works offline")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from headstart.jobs.train import prepare
    from headstart.training.lr_find import lr_find
    from headstart.training.optim import resolve_stages

    cfg = resolve_config(args)
    net, data = prepare(cfg)
    stages = resolve_stages(cfg.train, net)
    if not 1 <= args.stage <= len(stages):
        raise HeadstartError(f"--stage {args.stage}: the schedule has {len(stages)} stage(s)")
    result = lr_find(net, data, cfg, stages[args.stage - 1], steps=args.steps)
    result.save_plot(args.plot)
    print(f"suggested learning rate for stage {args.stage} ({stages[args.stage - 1].name}): {result.suggestion:.3g}")
    print(f"plot saved to {args.plot}; use it with --lr (or lr: auto in a stage)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from headstart.report import write_report

    print(f"report written to {write_report(args.run_dir, data_source=args.data)}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from headstart.training.cache import cache_entries, cache_root, clear_cache

    root = cache_root(args.dir)
    if args.action == "clear":
        print(f"removed {clear_cache(root)} cache entr(ies) from {root}")
        return 0
    entries = cache_entries(root)
    print(f"feature cache: {root}")
    for e in entries:
        print(f"  {e['key']}  {e['model']:<20} {e['part']:<10} {e['images']:>7} images  {e['views']} view(s)  "
              f"{e['bytes'] / 2**20:8.1f} MiB  {e['created']}  {e['source']}")
    print(f"{len(entries)} entr(ies), {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from headstart.deploy.commands import run_export

    return run_export(args)


def _run_serve(args: argparse.Namespace) -> int:
    from headstart.deploy.serve_cli import run_serve

    return run_serve(args)


COMMANDS = {"models": cmd_models, "inspect": cmd_inspect, "train": cmd_train, "eval": cmd_eval,
            "predict": cmd_predict, "weights": cmd_weights,
            "cache": cmd_cache, "lr-find": cmd_lr_find,
            "report": cmd_report, "export": _run_export, "serve": _run_serve}



def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s",
                        force=True)
    if args.command is None:
        args = parser.parse_args(["train", *(argv or [])])
    try:
        return COMMANDS[args.command](args)
    except HeadstartError as e:
        if args.debug:
            raise
        print(f"headstart: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\nheadstart: interrupted; `headstart train --resume RUN_DIR` continues a run", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())
