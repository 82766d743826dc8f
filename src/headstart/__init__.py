"""headstart: transfer learning of image classifiers on PyTorch.

The Python API mirrors the CLI; see README.md for the seed's workflow step by step and
ARCHITECTURE.md for where each concern lives.

Importing ``headstart`` is light: every public name below is imported on first use (PEP 562
``__getattr__``), so ``headstart --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from headstart.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "HeadstartError": "headstart.errors",
    "OfflineError": "headstart.errors",
    "CacheConfig": "headstart.config",
    "DataConfig": "headstart.config",
    "HeadConfig": "headstart.config",
    "ModelConfig": "headstart.config",
    "RunConfig": "headstart.config",
    "StageConfig": "headstart.config",
    "TrainConfig": "headstart.config",
    "apply_overrides": "headstart.config",
    "load_yaml": "headstart.config",
    "Network": "headstart.models.network",
    "build_network": "headstart.models.backbones",
    "list_backbones": "headstart.models.backbones",
    "load_network": "headstart.models.checkpoint",
    "count_params": "headstart.models.freeze",
    "freeze": "headstart.models.freeze",
    "trainable_state": "headstart.models.freeze",
    "unfreeze_last": "headstart.models.freeze",
    "build_data": "headstart.data",
    "evaluate": "headstart.evaluation.inference",
    "Interpretation": "headstart.evaluation.interpret",
    "interpret": "headstart.evaluation.interpret",
    "fit": "headstart.jobs.train",
    "lr_find": "headstart.training.lr_find",
    "write_report": "headstart.report",
    "group_table": "headstart.jobs.describe",
    "inspect_model": "headstart.jobs.describe",
    "evaluate_checkpoint": "headstart.jobs.evaluate",
    "predict": "headstart.jobs.predict",
    "prepare": "headstart.jobs.train",
    "train": "headstart.jobs.train",
}

__all__ = ["__version__", *sorted(_EXPORTS)]  # noqa: PLE0604, PLE0605 - built from the table above


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'headstart' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from headstart.config import (  # noqa: F401
        CacheConfig,
        DataConfig,
        HeadConfig,
        ModelConfig,
        RunConfig,
        StageConfig,
        TrainConfig,
        apply_overrides,
        load_yaml,
    )
    from headstart.data import build_data  # noqa: F401
    from headstart.errors import HeadstartError, OfflineError  # noqa: F401
    from headstart.evaluation.inference import evaluate  # noqa: F401
    from headstart.evaluation.interpret import Interpretation, interpret  # noqa: F401
    from headstart.jobs.describe import group_table, inspect_model  # noqa: F401
    from headstart.jobs.evaluate import evaluate_checkpoint  # noqa: F401
    from headstart.jobs.predict import predict  # noqa: F401
    from headstart.jobs.train import fit, prepare, train  # noqa: F401
    from headstart.models.backbones import build_network, list_backbones  # noqa: F401
    from headstart.models.checkpoint import load_network  # noqa: F401
    from headstart.models.freeze import count_params, freeze, trainable_state, unfreeze_last  # noqa: F401
    from headstart.models.network import Network  # noqa: F401
    from headstart.report import write_report  # noqa: F401
    from headstart.training.lr_find import lr_find  # noqa: F401
