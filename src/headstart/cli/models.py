"""``headstart models``, ``inspect`` and ``weights``: the backbones, their parts and their weights files."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.flags import add_config_flags, resolve_config
from headstart.config import RunConfig
from headstart.errors import HeadstartError


def add_models_parser(sub: Any) -> argparse.ArgumentParser:
    m = sub.add_parser("models", help="list backbones with parameter counts and input sizes")
    m.add_argument("pattern", nargs="?", default="*", help="glob or substring (resnet*, vit)")
    return m


def run_models(args: argparse.Namespace) -> int:
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


def add_inspect_parser(sub: Any) -> argparse.ArgumentParser:
    i = sub.add_parser("inspect", help="show a model's body, head, depth groups and training plan")
    i.add_argument("model")
    i.add_argument("--num-classes", type=int, help="replace the head for N classes")
    i.add_argument("--config", help="YAML run config whose schedule is shown")
    add_config_flags(i, skip={"model.name", "data.source", "data.root", "output", "name"})
    return i


def run_inspect(args: argparse.Namespace) -> int:
    from headstart.jobs.describe import inspect_model

    args.__dict__["model.name"] = args.model
    cfg = resolve_config(args)
    if cfg.model.weights == RunConfig().model.weights and getattr(args, "model.weights") is None:
        cfg.model.weights = "none"  # structure needs no download; --weights loads real ones
    print(inspect_model(cfg, num_classes=args.num_classes))
    return 0


def add_weights_parser(sub: Any) -> argparse.ArgumentParser:
    w = sub.add_parser("weights", help="manage pretrained weights files for offline use")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    wi = wsub.add_parser("import", help="check a downloaded file's hash and install it where torchvision looks")
    wi.add_argument("file")
    wi.add_argument("--force", action="store_true", help="replace a different file already installed")
    wsub.add_parser("where", help="print the folder torchvision loads weights from")
    return w


def run_weights(args: argparse.Namespace) -> int:
    from headstart.models.weights import hub_checkpoint_dir, import_weights_file

    if args.weights_command == "where":
        print(hub_checkpoint_dir())
        return 0
    path, member = import_weights_file(args.file, force=args.force)
    model = member.url.rsplit("/", 1)[-1]
    print(f"installed {path}\n  = torchvision {type(member).__name__}.{member.name} ({model}); "
          f"--weights {member.name} (or DEFAULT where it is the default) now works offline")
    return 0
