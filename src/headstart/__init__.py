"""headstart: transfer learning of image classifiers on PyTorch.

The Python API mirrors the CLI; see README.md for the seed's workflow step by step.
"""

__version__ = "0.1.0"

from .api import evaluate_checkpoint, predict, prepare, train
from .backbones import build_network, list_backbones
from .checkpoint import load_network
from .config import (
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
from .data import build_data
from .engine import evaluate, fit
from .errors import HeadstartError, OfflineError
from .freeze import count_params, freeze, trainable_state, unfreeze_last
from .inspect import group_table, inspect_model
from .interpret import Interpretation, interpret
from .lr_find import lr_find
from .network import Network
from .report import write_report

__all__ = [
    "Interpretation", "interpret", "lr_find", "write_report",
    "CacheConfig", "DataConfig", "HeadConfig", "HeadstartError", "ModelConfig", "Network", "OfflineError",
    "RunConfig", "StageConfig", "TrainConfig", "apply_overrides", "build_data", "build_network",
    "count_params", "evaluate", "evaluate_checkpoint", "fit", "freeze", "group_table", "inspect_model",
    "list_backbones", "load_network", "load_yaml", "predict", "prepare", "train", "trainable_state",
    "unfreeze_last",
]
