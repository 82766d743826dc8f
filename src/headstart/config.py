"""The one configuration tree shared by the CLI and the Python API.

A run is described by :class:`RunConfig`, a tree of small dataclasses. A YAML file sets it
(``--config run.yaml``), command-line flags override single fields, and the resolved tree is saved
beside every run (``config.yaml``) and inside every checkpoint, so a run can always be repeated.

Each field is declared once, with :func:`setting`: its default, its help text, its flag and the
values it accepts. The CLI's flags, the YAML keys and the ``--set key=value`` paths are all
generated from these declarations (:func:`settings`), and :func:`validate` checks a tree against
them, so adding a field with its help is all it takes to get a flag, a YAML key and a check.

Example::

    >>> cfg = RunConfig()
    >>> cfg = apply_overrides(cfg, {"model.name": "resnet18", "train.epochs": 2})
    >>> cfg.model.name, cfg.train.epochs
    ('resnet18', 2)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from headstart.errors import HeadstartError

# long module: the declarations of all ~70 settings are most of it, and they belong in one place
# (one declaration per setting); below them, the code that lists, converts and checks them.


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = "",  # noqa: A002
            factory: Any = dataclasses.MISSING, choices: tuple[str, ...] = (), shown: str = "",
            at_least: float | None = None, above: float | None = None, at_most: float | None = None,
            below: float | None = None, on_resume: bool = False) -> Any:
    """A config field with everything the CLI, the YAML schema and :func:`validate` need.

    ``flag``: the command-line flag; ``""`` derives it from the field name (``batch_size`` ->
    ``--batch-size``; a boolean that defaults to true gets ``--no-...``); None gives no flag (the
    YAML key and ``--set`` still work). ``choices``: the words a text value may take (for a
    ``float | str`` field, the words allowed besides numbers, e.g. ``auto``). ``shown``: the
    default as ``--help`` words it (needed when the default is None). The bounds apply to numbers
    and to each number of a list or mapping; numbers must also be finite. ``on_resume``: may be
    changed when a run resumes.
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices), "shown": shown, "on_resume": on_resume,
            "bounds": (at_least, above, at_most, below)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Which backbone to load, with which weights, at which input size."""

    name: str = setting("mobilenet_v2", flag="--model", help="backbone name (see `headstart models`), "
                        "a torchvision model or a packaged extra such as tf_efficientnet_lite0")
    weights: str = setting("DEFAULT", help="DEFAULT, a weights name (IMAGENET1K_V1), none (random), "
                           "or a local state-dict file (.pth, .pt, .safetensors)")
    # None: the weights' own crop size, but 64 px for the 8x8 digits, where 224 px would cost 12x
    # the compute for nothing.
    # (64 px: headstart.jobs.train.DIGITS_INPUT_SIZE)
    input_size: int | None = setting(None, help="square input size in pixels", above=0,
                                     shown="the weights' crop size, 224 px for most; 64 px for digits")


@dataclass
class HeadConfig:
    """The new classifier put on top of the body."""

    kind: str = setting("replace", flag="--head", choices=("replace", "linear", "mlp"),
                        help="new classifier: replace only the pretrained classifier's final layer "
                             "(the seed's way), one linear layer on the pooled features, or an MLP")
    hidden: list[int] = setting(factory=list, shown="none", above=0,
                                help="hidden sizes of an mlp head, comma-separated (512,256)")
    dropout: float = setting(0.0, help="dropout in a linear/mlp head", at_least=0, below=1)
    activation: str = setting("relu", choices=("relu", "gelu", "silu", "tanh", "leaky_relu"),
                              help="activation of an mlp head")
    batchnorm: bool = setting(False, flag="--head-batchnorm", help="batch norm in an mlp head")


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    source: str = setting("digits", flag="--data", help="digits (scikit-learn's bundled handwritten "
                          "digits), cifar10, cifar100, or an image folder (class subfolders, or train/ "
                          "and val/ holding them)")
    root: str = setting("~/.cache/headstart/datasets", flag="--data-root",
                        help="cache folder for downloadable datasets")
    val_split: float = setting(0.2, at_least=0, below=1,
                               help="fraction of the images held out for validation when the data has no split")
    batch_size: int = setting(64, at_least=1, help="images per batch")
    workers: int | None = setting(None, at_least=0, help="DataLoader worker processes",
                                  shown="0 for in-memory data, else up to 4, leaving a core free")
    augment: bool = setting(True, help="train-time augmentation (random resized crop and flip for photos)")
    auto_augment: str = setting("none", choices=("none", "randaugment", "trivialaugment"),
                                help="an automatic augmentation policy on top of the photo augmentation")
    balanced: bool = setting(False, help="draw training batches class-balanced (for imbalanced folders)")
    strict: bool = setting(False, help="unreadable images are an error instead of skipped with a warning")
    in_memory: bool | None = setting(None, shown="auto: when they fit in data.memory_gb",
                                     help="decode image files once and hold them in memory: yes, no or auto")
    memory_gb: float = setting(2.0, at_least=0, help="memory the in-memory images may take (GB)")
    # Per-image transforms in the loader keep up with a CPU's training, not with a GPU's.
    batch_transforms: bool | None = setting(None, shown="auto: on CUDA only",
                                            help="resize, crop, flip and normalise in-memory images a "
                                                 "batch at a time on the device: yes, no or auto")
    limit_train: int | None = setting(None, at_least=1, shown="all", help="use at most N training images")
    limit_val: int | None = setting(None, at_least=1, shown="all", help="use at most N validation images")


FREEZE_HELP = ("what does not train: body (only the head trains), none, first:K (the first K depth "
               "groups) or comma-separated glob patterns over parameter names (body.features.0.*)")
BN_POLICIES = ("frozen", "train", "eval-all")


@dataclass
class StageConfig:
    """One stage of the training schedule (a YAML list under ``train.stages``)."""

    name: str = setting("head", help="the stage's name in logs and metrics")
    epochs: int = setting(3, at_least=0, help="epochs of the stage")
    freeze: str = setting("body", help=FREEZE_HELP)
    lr: float | str | None = setting(None, choices=("auto",), at_least=0, shown="train.lr",
                                     help="base learning rate of the head, or auto (range test at the "
                                          "start of the stage)")
    layer_decay: float = setting(1.0, above=0, help="depth group i of G gets lr * layer_decay ** (G - i)")
    lr_mult: dict[str, float] = setting(factory=dict, shown="none", at_least=0,
                                        help="per-group multipliers by group name (head included), "
                                             "applied after layer_decay")
    bn: str = setting("frozen", choices=BN_POLICIES, help="BatchNorm in frozen parts: frozen (eval mode), "
                      "train (statistics update) or eval-all (every BatchNorm in eval mode, tiny batches)")
    solve: bool = setting(False, help="after the stage's epochs, fit the head's final layer to convergence "
                          "on the frozen body's features (L-BFGS, weight decay by cross-validation on the "
                          "training split): one more epoch row; needs a frozen body and a Linear final layer")


@dataclass
class TrainConfig:
    """How to train: the seed's two phases by default, or an explicit list of stages."""

    freeze: str = setting("body", help=f"head stage: {FREEZE_HELP}")
    # auto solves the final layer instead of sampling it with a few AdamW epochs: see
    # training/head_solver.py and bench/README.md ("head stage") for what it gained on real photos.
    epochs: int | str = setting("auto", choices=("auto",), at_least=0,
                                help="epochs of the head stage, or auto: fit the head's final layer to "
                                     "convergence on the frozen features (L-BFGS, weight decay chosen by "
                                     "5-fold cross-validation on the training split)")
    lr: float | str = setting(1e-3, choices=("auto",), at_least=0,
                              help="learning rate of the head stage, or auto (learning-rate range test)")
    optimizer: str = setting("adamw", choices=("adamw", "sgd"), help="optimizer")
    weight_decay: float = setting(0.01, at_least=0, help="weight decay (never on biases and norms)")
    momentum: float = setting(0.9, at_least=0, below=1, help="momentum of sgd (Nesterov when above 0)")
    warmup: float = setting(0.1, at_least=0, at_most=1, help="fraction of each stage's steps spent warming up")
    scheduler: str = setting("cosine", choices=("cosine", "onecycle", "constant"), help="learning-rate schedule")
    label_smoothing: float = setting(0.0, at_least=0, below=1, help="label smoothing of the loss")
    class_weights: bool = setting(False, help="weight the loss by inverse class frequency (imbalanced folders)")
    # Not used while training from cached features, where there are no images to mix.
    mixup: float = setting(0.0, at_least=0, help="mixup on images: alpha of the Beta distribution (0: off)")
    cutmix: float = setting(0.0, at_least=0, help="cutmix on images: alpha of the Beta distribution (0: off)")
    # bf16 autocast on a CPU without AMX measured slower here, hence fp32 on the CPU.
    precision: str = setting("auto", choices=("auto", "fp32", "bf16", "fp16"),
                             help="auto: bf16 on GPUs that have it, fp16 with a scaler on older ones, fp32 on CPU")
    channels_last: bool | None = setting(None, shown="auto: on CUDA, where convolutions run faster",
                                         help="channels-last memory format: yes, no or auto")
    compile: bool = setting(False, help="torch.compile the network (a compile time up front; for long GPU runs)")
    finetune_epochs: int = setting(0, at_least=0, help="epochs of the fine-tuning stage (0: none)")
    finetune_unfreeze: str = setting("all", help="all, or how many last depth groups fine-tuning unfreezes")
    finetune_lr: float | str = setting(3e-4, choices=("auto",), at_least=0,
                                       help="base learning rate of fine-tuning, or auto")
    # eval-all keeps the pretrained statistics (scales and shifts still train): on the digits demo
    # it reached 97.2% against 92.5% with batch statistics, whose switch from ImageNet to digit
    # statistics first knocked accuracy down to 56%.
    finetune_bn: str = setting("eval-all", choices=BN_POLICIES,
                               help="BatchNorm while fine-tuning (eval-all keeps pretrained statistics)")
    # The deepest group trains at 0.7x the head's rate, the stem at 0.7^G. Measured with
    # mobilenet_v2, 2-3 fine-tuning epochs: an 800-image CIFAR-10 folder 58.8% -> 66.9% (0.6),
    # digits 97.5% -> 96.1%.
    layer_decay: float = setting(0.7, above=0, help="per-group learning-rate decay in fine-tuning")
    schedule: str = setting("two-phase", choices=("two-phase", "gradual"),
                            help="the seed's two phases, or gradual unfreezing (one more group per epoch)")
    stages: list[StageConfig] = setting(factory=list, flag=None, shown="the two phases above",
                                        help="explicit stages (YAML), replacing the phases above")
    patience: int | None = setting(None, at_least=1, shown="off",
                                   help="stop a stage after N epochs without improvement")
    # See training/budget.py for how the plan is chosen.
    budget: str | None = setting(None, shown="off",
                                 help="wall-time budget of the run (15m, 1h, 1h30m): after the head stage, "
                                      "fine-tuning plans (the last K depth groups, or everything) are timed "
                                      "and the deepest that fits 3 epochs runs, stopping early when "
                                      "validation stops improving; with --finetune-epochs it only bounds the time")
    # A resumed run redoes none of the batches already trained and ends exactly as if uninterrupted.
    checkpoint_minutes: float | None = setting(10.0, at_least=0, on_resume=True,
                                               help="mid-epoch last.pt at most every N minutes of training (0: off)")
    checkpoint_steps: int | None = setting(None, at_least=0, shown="off", help="mid-epoch last.pt every N steps")
    seed: int = setting(0, help="random seed (a CPU run repeats exactly)")
    device: str = setting("auto", on_resume=True, help="auto (cuda when there is one), cpu, cuda or cuda:N")
    progress: bool = setting(True, on_resume=True, help="progress bars (plain lines when not a terminal)")


@dataclass
class CacheConfig:
    """Cached features of a frozen body (see :mod:`headstart.training.cache`)."""

    enabled: bool = setting(True, flag="--no-cache",
                            help="compute a frozen body's features once and train the head from them")
    dir: str | None = setting(None, flag="--cache-dir", shown="$HEADSTART_CACHE or ~/.cache/headstart/features",
                              help="feature cache folder")
    views: int = setting(1, flag="--cache-views", at_least=1,
                         help="cached views per image (1: plain; more: augmented copies, cycled by epoch)")
    prefix: bool = setting(True, flag="--no-cache-prefix",
                           help="while only the last depth groups train, cache the frozen first part's output")
    # Early feature maps of big images take a lot of space; above this the stage runs the whole network.
    max_gb: float = setting(8.0, flag="--cache-max-gb", at_least=0, help="largest cache built for a stage (GB)")
    # ONNX Runtime ran MobileNetV2's frozen body 2.7x faster than torch eager end to end on a
    # 2-core CPU (bench/infer.py --body); its features are checked against PyTorch's first.
    engine: str = setting("auto", flag="--cache-engine", choices=("auto", "torch", "onnx"), on_resume=True,
                          help="what runs the frozen body for the cache: auto (ONNX Runtime, verified against "
                               "PyTorch on the first batch, on the CPU at fp32 when it is installed, the whole "
                               "body is cached and there are 500+ images' worth at 224 px), torch, or onnx "
                               "(try it wherever the whole body is cached)")


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    report: bool = setting(True, help="write report/report.html at the end of training")
    tensorboard: bool = setting(True, help="TensorBoard event files in the run folder")
    output: str = setting("runs", help="folder for run folders")
    name: str | None = setting(None, shown="time, model and data", help="run folder name")


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Setting:
    """One leaf field of a config tree, as :func:`settings` lists it."""

    key: str  # dotted path: train.lr
    type: Any  # the resolved type hint
    default: Any
    help: str
    flag: str | None
    choices: tuple[str, ...]
    shown: str  # the default in words
    on_resume: bool


@functools.cache  # the parser asks once per command that takes config flags
def settings(cls: type = RunConfig, prefix: str = "") -> tuple[Setting, ...]:
    """Every leaf field of the config tree ``cls``, depth first, in declaration order."""
    out: list[Setting] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += settings(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        m = f.metadata
        if "help" not in m:
            raise TypeError(f"config field {prefix}{f.name} has no help: declare it with setting(..., help=...)")
        out.append(Setting(f"{prefix}{f.name}", hints[f.name], default, m["help"], _flag(f, default),
                           m["choices"], m["shown"] or _shown(default), m["on_resume"]))
    return tuple(out)


def _flag(f: dataclasses.Field, default: Any) -> str | None:
    flag = f.metadata.get("flag")
    if flag != "":
        return flag
    return ("--no-" if default is True else "--") + f.name.replace("_", "-")


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, list | dict):
        return ",".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


# --------------------------------------------------------------------------- conversions


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain Python data (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking names, types and values as it goes."""
    data = data or {}
    if not isinstance(data, dict):
        raise HeadstartError(f"config{' ' + where.rstrip('.') if where else ''}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise HeadstartError(
            f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
            f"known keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(hints[k], v, f"{where}{k}")
        if fields[k].metadata:
            _check(fields[k], hints[k], kwargs[k], f"{where}{k}")
    return cls(**kwargs)


def validate(cfg: Any) -> Any:
    """Check a whole config tree (types, words and bounds) and return it converted, as loading does.

    The YAML file, the flags and ``--set`` are checked as they are read; a tree built or changed in
    Python is checked here. Example: ``cfg.train.lr = -1; validate(cfg)`` raises HeadstartError
    naming ``train.lr``.
    """
    return from_dict(type(cfg), to_dict(cfg))


def _check(f: dataclasses.Field, tp: Any, value: Any, key: str) -> None:
    """Raise a one-line HeadstartError when ``value`` is outside what field ``f`` declares."""
    flag = _flag(f, f.default)
    name = f"config {key}" + (f" ({flag})" if flag else "")
    choices = f.metadata.get("choices", ())
    bounds = f.metadata.get("bounds", (None,) * 4)
    has_default = f.default is not dataclasses.MISSING
    default = f" (default {f.metadata.get('shown') or _shown(f.default)})" if has_default else ""
    items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]
    for v in items:
        if isinstance(v, str) and choices and v not in choices:
            kinds = set(typing.get_args(tp))
            numbers = "a number or " if float in kinds else "a whole number or " if int in kinds else ""
            raise HeadstartError(f"{name} is {v!r}: give {numbers}one of: {', '.join(choices)}{default}")
        if isinstance(v, int | float) and not isinstance(v, bool) and not _in_bounds(v, *bounds):
            what = "" if math.isfinite(v) else ", not a finite number"
            want = f"that is {_bounds_text(*bounds) or 'finite'}"
            raise HeadstartError(f"{name} is {v!r}{what}: give a number {want}{default}")


def _in_bounds(v: float, at_least: float | None, above: float | None, at_most: float | None,
               below: float | None) -> bool:
    return (math.isfinite(v) and (at_least is None or v >= at_least) and (above is None or v > above)
            and (at_most is None or v <= at_most) and (below is None or v < below))


def _bounds_text(at_least: float | None, above: float | None, at_most: float | None, below: float | None) -> str:
    words = (("{:g} or more", at_least), ("above {:g}", above), ("{:g} or less", at_most), ("below {:g}", below))
    return " and ".join(w.format(b) for w, b in words if b is not None)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for tp_ in (a for a in args if a is not type(None)):  # the first type that takes the value wins
            if tp_ is str and errors and _numeric_text(value):
                break  # "2.5" for int | str: the number's complaint ("a whole number") is the useful one
            try:
                return _coerce(tp_, value, where)
            except HeadstartError as e:
                errors.append(e)
        raise errors[0]  # the first type's complaint: for float | str, "expected a number"
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise HeadstartError(f"config {where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):  # "a=1,b=2" from the command line
            pairs = [kv.split("=", 1) for kv in value.split(",") if kv.strip()]
            if any(len(p) != 2 for p in pairs):
                raise HeadstartError(f"config {where}: expected name=value pairs (head=2,layer4=0.5), got {value!r}")
            value = dict(pairs)
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
        return _number(tp, value, where)
    if tp is str:
        if isinstance(value, dict | list | bool):  # YAML reads yes/no/on/off as booleans
            quote = "; quote it in YAML ('no')" if isinstance(value, bool) else ""
            raise HeadstartError(f"config {where}: expected text, got {value!r}{quote}")
        return str(value)
    return value


def _numeric_text(value: Any) -> bool:
    try:
        float(value)
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def _number(tp: type, value: Any, where: str) -> int | float:
    """``value`` as an int or float; booleans are refused (YAML's ``epochs: true`` is no count)."""
    word = "a whole number" if tp is int else "a number"
    hint = " (YAML reads true/false/yes/no/on/off as booleans)" if isinstance(value, bool) else ""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, numbers.Real):  # numpy's numbers included
            raise TypeError
        if tp is int:
            if not isinstance(number, numbers.Integral) and not float(number).is_integer():
                raise ValueError
            return int(number)
        return float(number)
    except (TypeError, ValueError, OverflowError):
        raise HeadstartError(f"config {where}: expected {word}, got {value!r}{hint}") from None


def load_yaml(path: str | Path, cls: type = RunConfig) -> Any:
    """Read a run config from a YAML file (checked as :func:`from_dict` checks)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
        data = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise HeadstartError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise HeadstartError(f"config file {p} is a folder; give the path of a YAML file") from None
    except PermissionError:
        raise HeadstartError(f"config file {p} cannot be read (permission denied)") from None
    except UnicodeDecodeError as e:
        raise HeadstartError(f"config file {p} is not a text file (byte {e.start} is not UTF-8); "
                             "give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise HeadstartError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise HeadstartError(f"config file {p} holds a {type(data).__name__}, not a mapping of config keys "
                             "(model:, data:, train:, ...)")
    return from_dict(cls, data)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a checked copy of ``cfg`` with dotted keys (``train.lr``) set to new values."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise HeadstartError(f"unknown config key {key}; `headstart train --help` lists every key")
            node = node[p]
        if leaf not in node:
            raise HeadstartError(f"unknown config key {key}; `headstart train --help` lists every key")
        node[leaf] = value
    return from_dict(type(cfg), data)
