"""Reading a run folder for the report: config, summary, history, checkpoint, and each stage's plan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.errors import HeadstartError

if TYPE_CHECKING:  # pragma: no cover
    from headstart.training.optim import StagePlan


@dataclass
class RunRecord:
    """What a run folder holds, read once."""

    path: Path
    cfg: Any = None  # RunConfig, None when config.yaml is missing or unreadable
    config_text: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


def read_run(run_dir: str | Path) -> RunRecord:
    """Config, summary, per-epoch history and best checkpoint of a run folder."""
    from headstart.config import load_yaml

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise HeadstartError(f"run folder {path} does not exist")
    run = RunRecord(path)
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        run.config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            run.cfg = load_yaml(cfg_path)
        except HeadstartError:
            run.cfg = None
    if (path / "summary.json").is_file():
        try:
            run.summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            run.summary = {}
    from headstart.training.runs import RunDir

    run.history = RunDir(path).history() if (path / "metrics.jsonl").is_file() else []
    run.checkpoint = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), None)
    return run


def try_interpret(run: RunRecord, data_source: str | None) -> tuple[Any, str]:
    if run.checkpoint is None:
        return None, "the run folder has no checkpoint (best.pt or last.pt) yet"
    from headstart.evaluation.interpret import interpret

    try:
        return interpret(run.checkpoint, data_source=data_source), ""
    except HeadstartError as e:
        return None, str(e)


def stage_plans(cfg: Any, net: Any) -> list[StagePlan]:
    """Each stage of ``cfg.train`` as it applies to ``net``: freeze state, rates, trainable parameters."""
    from headstart.training.optim import describe_stage, resolve_stages

    return [describe_stage(net, st, cfg) for st in resolve_stages(cfg.train, net)]
