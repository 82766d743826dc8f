"""Reading a run folder for the report: config, summary, history, checkpoint, per-step learning
rates (from the TensorBoard events), and each stage's plan."""

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
    steps: StepRates | None = None  # None when the run folder has no readable TensorBoard events
    steps_note: str = ""  # why there are no per-step rates


@dataclass
class StepRates:
    """Each parameter group's learning rate at every optimizer step, as ``RunDir.tb_step`` logged it.

    ``steps_per_epoch`` converts a step to the epoch axis of the learning curves: step ``s`` (the
    first is 1) falls inside epoch ``ceil(s / steps_per_epoch)``.
    """

    steps_per_epoch: float
    lrs: dict[str, list[tuple[int, float]]]  # group -> (step, rate used at that step), by step

    def epoch_position(self, step: int) -> float:
        """Where ``step`` lies on the curves' epoch axis, where epoch ``g`` spans ``g - 0.5`` to ``g + 0.5``."""
        return 0.5 + (step - 0.5) / self.steps_per_epoch


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
    run.steps, run.steps_note = read_step_rates(path)
    return run


def read_step_rates(path: Path) -> tuple[StepRates | None, str]:
    """The per-step learning rates in the run folder's TensorBoard events, or None and why not."""
    if not any(path.glob("events.out.tfevents.*")):
        return None, "the run folder has no TensorBoard events (the run had tensorboard off)"
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None, "the tensorboard package, which reads the run's events, is not installed"
    try:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: every event, not a sample
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        lrs = {t.removeprefix("lr/"): _last_per_step(acc.Scalars(t)) for t in tags if t.startswith("lr/")}
        epochs = acc.Scalars("epoch/train_loss") if "epoch/train_loss" in tags else []
    except Exception as e:  # noqa: BLE001 - a torn event file must not cost the whole report
        return None, f"the run's TensorBoard events cannot be read ({type(e).__name__}: {e})"
    per_epoch = _steps_per_epoch(lrs, epochs)
    if not lrs or per_epoch is None:
        return None, "the run's TensorBoard events hold no learning rates for a finished epoch"
    return StepRates(per_epoch, {g: [(s, v) for s, v, _ in pts] for g, pts in lrs.items()}), ""


def _last_per_step(events: Any) -> list[tuple[int, float, float]]:
    """(step, value, wall time) by step; a step logged twice keeps its later value: a resumed run
    repeats the steps after its last checkpoint, and the repeat is what the model kept."""
    by_step = {}
    for e in events:
        by_step[e.step] = (e.step, e.value, e.wall_time)
    return [by_step[k] for k in sorted(by_step)]


def _steps_per_epoch(lrs: dict[str, list[tuple[int, float, float]]], epochs: Any) -> float | None:
    """Optimizer steps per epoch: the last step logged before the last epoch's row, over that epoch's number.

    The epoch rows are written after the epoch's steps (and its validation), so wall times order them;
    steps of an epoch cut short after it are left out of the count.
    """
    if not epochs:
        return None
    last = max(epochs, key=lambda e: e.wall_time)
    done = max((s for pts in lrs.values() for s, _, t in pts if t <= last.wall_time), default=0)
    return done / last.step if done and last.step > 0 else None


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
