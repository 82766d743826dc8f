"""The one configuration tree shared by the CLI and the Python API.

A run is described by :class:`RunConfig`, a tree of small dataclasses. A YAML file sets it
(``--config run.yaml``), command-line flags override single fields, and the resolved tree is saved
beside every run (``config.yaml``) and inside every checkpoint, so a run can always be repeated.

Example::

    >>> cfg = RunConfig()
    >>> cfg = apply_overrides(cfg, {"model.name": "resnet18", "train.epochs": 2})
    >>> cfg.model.name, cfg.train.epochs
    ('resnet18', 2)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from headstart.errors import HeadstartError


@dataclass
class ModelConfig:
    """Which backbone to load, with which weights, at which input size."""

    # A torchvision classification model name (``headstart models`` lists them) or a packaged
    # extra such as ``tf_efficientnet_lite0``.
    name: str = "mobilenet_v2"
    # ``DEFAULT``, a named weights entry (``IMAGENET1K_V1``), ``none`` for random weights, or a
    # path to a local state-dict file (.pth, .pt, .safetensors).
    weights: str = "DEFAULT"
    # Square input size fed to the network; None means the weights' own crop size (64 px for
    # the 8x8 digits, where 224 px would cost 12x the compute for nothing).
    input_size: int | None = None


@dataclass
class HeadConfig:
    """The new classifier put on top of the body."""

    # ``replace``: keep the pretrained classifier and swap only its final layer (the seed's way);
    # ``linear``: one new layer on the pooled features; ``mlp``: several new layers.
    kind: str = "replace"
    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.0
    activation: str = "relu"
    batchnorm: bool = False


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    # ``digits`` (scikit-learn's bundled handwritten digits), ``cifar10``, ``cifar100``, or a
    # path to an image folder (class subfolders, or ``train/`` and ``val/`` holding them).
    source: str = "digits"
    # Where downloadable datasets are cached.
    root: str = "~/.cache/headstart/datasets"
    # Fraction of the training images held out for validation when the source has no split.
    val_split: float = 0.2
    batch_size: int = 64
    # DataLoader worker processes; None chooses from the machine's cores.
    workers: int | None = None
    # Train-time augmentation (random resized crop and horizontal flip for photos).
    augment: bool = True
    # An automatic policy on top of the photo augmentation: none, randaugment, trivialaugment.
    auto_augment: str = "none"
    # Draw training batches class-balanced (for imbalanced folders).
    balanced: bool = False
    # Unreadable images are an error instead of a skipped-with-warning.
    strict: bool = False
    # Decode image files once and hold them in memory as uint8 tensors: None = when they fit in
    # ``memory_gb``; true forces it (with a check), false reads every file every epoch.
    in_memory: bool | None = None
    memory_gb: float = 2.0
    # Resize, crop, flip and normalise in-memory images a batch at a time on the training
    # device (GPU augmentation) instead of image by image in the loader; None = on CUDA only.
    batch_transforms: bool | None = None
    # Use at most this many training / validation images (quick runs and tests).
    limit_train: int | None = None
    limit_val: int | None = None


@dataclass
class StageConfig:
    """One stage of the training schedule.

    ``freeze`` says what does not train in this stage: ``body`` (only the head trains),
    ``none`` (everything trains), ``first:K`` (the first K depth groups are frozen), or
    comma-separated glob patterns over parameter names (``body.features.0.*``).
    """

    name: str = "head"
    epochs: int = 3
    freeze: str = "body"
    # Base learning rate of the head; None inherits ``train.lr``; ``auto`` runs the
    # learning-rate range test at the start of the stage and uses its suggestion.
    lr: float | str | None = None
    # Discriminative rates: depth group i of G gets ``lr * layer_decay ** (G - i)``.
    layer_decay: float = 1.0
    # Per-group multipliers by group name (``head`` included), applied after layer_decay.
    lr_mult: dict[str, float] = field(default_factory=dict)
    # BatchNorm in frozen parts: ``frozen`` (eval mode, statistics kept), ``train`` (statistics
    # update), ``eval-all`` (every BatchNorm in eval mode, for tiny batches).
    bn: str = "frozen"


@dataclass
class TrainConfig:
    """How to train: the seed's two phases by default, or an explicit list of stages."""

    # What the first (head) stage freezes: body, none, first:K or name patterns.
    freeze: str = "body"
    epochs: int = 5
    # A number, or ``auto`` (the learning-rate range test picks it at the start of the stage).
    lr: float | str = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    # Fraction of each stage's steps spent warming the learning rate up linearly.
    warmup: float = 0.1
    scheduler: str = "cosine"
    label_smoothing: float = 0.0
    # Weight the loss by inverse class frequency (for imbalanced folders).
    class_weights: bool = False
    # Batch mixing on images (alpha of the Beta distribution; 0 = off). Not used while training
    # from cached features, where there are no images to mix.
    mixup: float = 0.0
    cutmix: float = 0.0
    # ``auto``: bf16 autocast on GPUs that have it, fp16 with a gradient scaler on older GPUs,
    # fp32 on the CPU (bf16 autocast on a CPU without AMX measured slower here).
    precision: str = "auto"
    # Channels-last memory format; None = on for CUDA, where convolutions run faster with it.
    channels_last: bool | None = None
    # torch.compile the network (pays a compile time up front; worth it for long GPU runs).
    compile: bool = False
    # The seed's fine-tuning phase: 0 epochs skips it.
    finetune_epochs: int = 0
    # ``all`` or the number of last depth groups unfrozen for fine-tuning.
    finetune_unfreeze: str = "all"
    finetune_lr: float | str = 3e-4
    # BatchNorm while fine-tuning. ``eval-all`` keeps the pretrained statistics (scales and shifts
    # still train): on the digits demo it reached 97.2% against 92.5% with batch statistics,
    # whose switch from ImageNet to digit statistics first knocked accuracy down to 56%.
    finetune_bn: str = "eval-all"
    # Discriminative rates in the fine-tuning stage (see StageConfig.layer_decay): the deepest
    # group trains at 0.7x the head's rate, the stem at 0.7^G. Measured with mobilenet_v2, 2-3
    # fine-tuning epochs: an 800-image CIFAR-10 folder 58.8% -> 66.9% (0.6), digits 97.5% -> 96.1%.
    layer_decay: float = 0.7
    # ``two-phase`` (the seed's) or ``gradual`` (one more depth group per epoch, deepest first).
    schedule: str = "two-phase"
    # When set, replaces the two phases above.
    stages: list[StageConfig] = field(default_factory=list)
    # Stop a stage when validation accuracy has not improved for this many epochs.
    patience: int | None = None
    # Mid-epoch checkpoints: ``last.pt`` is also written inside an epoch, at most every this many
    # minutes of training (None or 0: only at epoch ends) and/or every this many steps, so a
    # resumed run redoes none of the batches already trained and ends exactly as if uninterrupted.
    checkpoint_minutes: float | None = 10.0
    checkpoint_steps: int | None = None
    seed: int = 0
    # ``auto`` picks cuda when there is one.
    device: str = "auto"
    # Show progress bars (plain periodic lines when the output is not a terminal).
    progress: bool = True


@dataclass
class CacheConfig:
    """Cached features of a frozen body (see :mod:`headstart.training.cache`)."""

    # Compute a fully frozen body's features once and train the head from them.
    enabled: bool = True
    # Where entries live; None means $HEADSTART_CACHE or ~/.cache/headstart/features.
    dir: str | None = None
    # View 0 is the plain image; views 1..K-1 are augmented copies, cycled through by epoch.
    views: int = 1
    # While only the last depth groups train, cache the frozen first part's output too.
    prefix: bool = True
    # Largest cache (all views and the validation split) built for a stage; above it the stage
    # runs the whole network (early feature maps of big images take a lot of space).
    max_gb: float = 8.0


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Write report/report.html (curves, confusion matrix, mistakes) at the end of training.
    report: bool = True
    # TensorBoard event files in the run folder (``tensorboard --logdir runs/``).
    tensorboard: bool = True
    # Runs are written to ``output/name``; name None means a fresh timestamped name.
    output: str = "runs"
    name: str | None = None


# --------------------------------------------------------------------------- conversions


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain Python data (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking names and types as it goes."""
    data = data or {}
    if not isinstance(data, dict):
        raise HeadstartError(f"config{where or ''}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise HeadstartError(
            f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
            f"known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for i, tp_ in enumerate(inner):  # the first type that takes the value wins
            try:
                return _coerce(tp_, value, where)
            except HeadstartError:
                if i == len(inner) - 1:
                    raise
        raise HeadstartError(f"config {where}: cannot use {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise HeadstartError(f"config {where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):  # "a=1,b=2" from the command line
            value = dict(kv.split("=", 1) for kv in value.split(",") if kv)
        if not isinstance(value, dict):
            raise HeadstartError(f"config {where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise HeadstartError(f"config {where}: expected true or false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value) if not isinstance(value, str) else tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise HeadstartError(f"config {where}: expected a number ({tp.__name__}), got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise HeadstartError(f"config {where}: expected text, got {value!r}")
        return str(value)
    return value


def load_yaml(path: str | Path) -> RunConfig:
    """Read a run config from a YAML file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise HeadstartError(f"config file {p} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise HeadstartError(f"config file {p} is not valid YAML{where}: {problem}") from None
    return from_dict(RunConfig, data)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of ``cfg`` with dotted keys (``train.lr``) set to new values."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise HeadstartError(f"unknown config key {key}")
            node = node[p]
        if leaf not in node:
            raise HeadstartError(f"unknown config key {key}")
        node[leaf] = value
    return from_dict(RunConfig, data)
