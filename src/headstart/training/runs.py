"""The run folder: one per training run, holding everything needed to understand and repeat it.

``runs/<name>/`` gets ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch),
``metrics.jsonl`` (the same rows with every group's learning rate), ``best.pt`` and ``last.pt``
checkpoints and, at the end, ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from headstart.config import RunConfig, save_yaml
from headstart.errors import HeadstartError

log = logging.getLogger(__name__)
CSV_FIELDS = ["global_epoch", "stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5",
              "seconds", "images_per_s", "lr_head"]


def claim_folder(root: Path, name: str) -> Path:
    """Create ``root/name`` (or ``name-2``, ``name-3``, ... when taken) and return it.

    The folder is made with an exclusive ``mkdir``, so two runs started at the same moment with
    the same name (or the same timestamp) can never share a folder: the second gets the next free
    name, and the log says so.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HeadstartError(f"cannot create the output folder {root}: {e.strerror or e}") from None
    for i in range(1, 10_000):
        path = root / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise HeadstartError(f"cannot create the run folder {path}: {e.strerror or e}; choose another "
                                 "--output") from None
        if i > 1:
            log.warning("run folder %s is taken; this run writes to %s", root / name, path)
        return path
    raise HeadstartError(f"no free run folder name under {root} for {name!r}; choose another --name")


class RunDir:
    """A run folder; created on construction, appended to as training goes.

    With ``tensorboard`` on, TensorBoard event files are written into the folder too, so
    ``tensorboard --logdir runs/`` shows every run: per-step loss and learning rates, per-epoch
    metrics, the final confusion matrix and the run's hyper-parameters.
    """

    def __init__(self, path: str | Path, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional at run time
                log.info("tensorboard is not installed: no event files for %s", self.path)
            else:
                self._tb = SummaryWriter(log_dir=str(self.path))

    @property
    def has_tensorboard(self) -> bool:
        """Whether event files are being written for this run."""
        return self._tb is not None

    def tb_step(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        if self._tb is not None:
            self._tb.add_scalar("step/train_loss", loss, step)
            for name, lr in lrs.items():
                self._tb.add_scalar(f"lr/{name}", lr, step)

    def tb_epoch(self, row: dict[str, Any]) -> None:
        if self._tb is not None:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "images_per_s"):
                self._tb.add_scalar(f"epoch/{key}", row[key], row["global_epoch"])

    def tb_final(self, hparams: dict[str, Any], metrics: dict[str, float], confusion_png: bytes | None) -> None:
        if self._tb is None:
            return
        if confusion_png is not None:
            import io

            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(io.BytesIO(confusion_png)).convert("RGB"))
            self._tb.add_image("confusion_matrix", image, dataformats="HWC")
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self._tb.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    @classmethod
    def new(cls, cfg: RunConfig, tensorboard: bool = False) -> "RunDir":
        """A fresh folder under ``cfg.output``, named ``cfg.name`` or by time, model and data."""
        root = Path(cfg.output).expanduser()
        if cfg.name:
            name = cfg.name
        else:
            data = Path(cfg.data.source).name or "data"
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.name}-{data}"
        path = claim_folder(root, name)
        return cls(path, tensorboard)

    def write_config(self, cfg: RunConfig) -> None:
        save_yaml(cfg, self.path / "config.yaml")

    def log_epoch(self, row: dict[str, Any]) -> None:
        csv_path = self.path / "metrics.csv"
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row | {"lr_head": row["lrs"].get("head")})
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    def history(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    def truncate_history(self, epochs: int) -> None:
        """Drop rows past ``epochs`` (those of an interrupted epoch's successors) before resuming."""
        rows = self.history()[:epochs]
        (self.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with (self.path / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r | {"lr_head": r["lrs"].get("head")})

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.path / "summary.json")
