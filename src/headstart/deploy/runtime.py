"""One loaded model, whatever its format: a :class:`Predictor`.

``open_predictor(path)`` takes a run folder, a ``.pt`` checkpoint or an export folder (written by
``headstart export``) and returns an object with the model's classes, its metadata (what an
export's ``config.json`` holds), its own eval transform (:meth:`Predictor.preprocess`) and a
logits function on NumPy batches (:meth:`Predictor.logits`). Export folders need nothing from
the training run; engines are imported only when a model needs them.

Example::

    >>> p = open_predictor("runs/pets/best.pt")                    # doctest: +SKIP
    >>> x = p.preprocess(PIL.Image.open("cat.jpg"))[None]           # doctest: +SKIP
    >>> p.classes[int(p.logits(x).argmax())]                        # doctest: +SKIP
    'cat'
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from headstart.errors import HeadstartError

if TYPE_CHECKING:
    from PIL import Image

CONFIG = "config.json"
CARD = "README.md"
EXPORT_FORMAT = "headstart-export/1"
BACKENDS = ("torch", "torchscript", "onnx")

Runner = Callable[[np.ndarray], np.ndarray]


class Predictor:
    """A loaded model: ``preprocess`` an image, ``logits`` of a batch, and what describes it.

    ``model_id`` is the architecture and a short hash of the model file (``resnet18-3f2a1c``);
    ``metadata`` holds arch, source, classes, preprocessing, verification and ``card`` (the
    model card's markdown, or None). ``logits`` is safe to call from one thread at a time per
    predictor; a server runs its batches on one worker thread.
    """

    def __init__(self, *, model_id: str, metadata: dict[str, Any], backend: str, run: Runner) -> None:
        self.model_id, self.metadata, self.backend = model_id, metadata, backend
        self.classes: list[str] = list(metadata["classes"])
        self._run = run
        self._transform = eval_transform(metadata)
        size = int(metadata["preprocessing"]["crop"])
        self.input_shape = (3, size, size)

    def preprocess(self, image: "Image.Image") -> np.ndarray:
        """The model's own eval transform: any PIL image -> ``(3, H, W)`` float32, normalised."""
        from headstart.data import to_rgb

        return self._transform(to_rgb(image)).numpy().astype(np.float32, copy=False)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """``(N, 3, H, W)`` float32 -> ``(N, C)`` float32 logits."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise HeadstartError(f"{self.model_id} takes batches of shape (N, {shape}), "
                                 f"got {tuple(batch.shape)}")
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.asarray(self._run(batch), dtype=np.float32)

    def __repr__(self) -> str:
        return f"Predictor({self.model_id}, backend={self.backend}, {len(self.classes)} classes)"


def eval_transform(metadata: dict[str, Any]) -> Callable[[Any], Any]:
    """The eval transform a model's record describes (headstart's own, as ``predict`` uses)."""
    from headstart.data import build_transform
    from headstart.models import Preprocessing

    pre = Preprocessing.from_dict(metadata["preprocessing"])
    return build_transform(pre, train=False, augment=False, kind=metadata.get("kind", "photo"))


# ---------------------------------------------------------------------- opening


def open_predictor(path: str | Path, backend: str | None = None, device: str = "cpu") -> Predictor:
    """A :class:`Predictor` for a run folder, a ``.pt`` checkpoint or an export folder.

    ``backend`` None takes the natural engine: ``torch`` for runs and checkpoints, the export's
    own format for export folders. ``onnx`` (or ``torchscript``) on a checkpoint converts it in
    memory, verifies the conversion against the PyTorch model, and runs that.
    """
    if backend is not None and backend not in BACKENDS:
        raise HeadstartError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    p = Path(path).expanduser()
    if p.is_dir() and (p / CONFIG).is_file():
        return open_export(p, backend, device)
    return open_checkpoint(p, backend or "torch", device)


def read_export_config(folder: Path) -> dict[str, Any]:
    """An export folder's ``config.json``, checked, with the card's text under ``card``."""
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise HeadstartError(f"cannot read {folder / CONFIG}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise HeadstartError(f"{folder / CONFIG} is not a headstart export (no '{EXPORT_FORMAT}' record); "
                             "write one with `headstart export RUN --format onnx`")
    card = folder / CARD
    meta["card"] = card.read_text() if card.is_file() else None
    return meta


def open_export(folder: Path, backend: str | None, device: str) -> Predictor:
    """A predictor for an export folder: its ONNX, TorchScript or safetensors file alone."""
    meta = read_export_config(folder)
    fmt = meta["model_format"]
    file = folder / meta["model_file"]
    if not file.is_file():
        raise HeadstartError(f"export {folder} lists model file {meta['model_file']}, which is missing")
    natural = {"onnx": "onnx", "torchscript": "torchscript", "safetensors": "torch"}[fmt]
    # A TorchScript file runs on PyTorch: asking for "torch" gets it.
    wanted = backend or natural
    if wanted == "torch" and natural == "torchscript":
        wanted = "torchscript"
    if wanted != natural:
        raise HeadstartError(f"export {folder} holds a {fmt} model, which runs with --backend {natural}, not "
                             f"{backend}; export again with --format {backend} or serve the checkpoint")
    data = file.read_bytes()
    model_id = f"{meta['arch']}-{short_hash(data)}"
    if natural == "onnx":
        run = onnx_runner(data, device)
    elif natural == "torchscript":
        run = torchscript_runner(data, device)
    else:
        run = library_runner(meta, data, device)
    return Predictor(model_id=model_id, metadata=meta, backend=natural, run=run)


def open_checkpoint(path: Path, backend: str, device: str) -> Predictor:
    """A predictor for a checkpoint (or a run folder's best one), run by ``backend``."""
    from headstart.models import load_network, read_checkpoint

    ckpt_file = checkpoint_file(path)
    ckpt = read_checkpoint(ckpt_file)
    net, _ = load_network(ckpt)
    meta = checkpoint_metadata(ckpt, ckpt_file)
    model_id = f"{meta['arch']}-{file_hash(ckpt_file)}"
    if backend == "torch":
        return Predictor(model_id=model_id, metadata=meta, backend="torch", run=torch_runner(net, device))
    from . import convert, verify

    data = convert.to_onnx(net)[0] if backend == "onnx" else convert.to_torchscript(net)
    run = onnx_runner(data, device) if backend == "onnx" else torchscript_runner(data, device)
    batches = verify.random_batches((3, net.preprocessing.crop, net.preprocessing.crop))
    v = verify.compare(verify.run_all(torch_runner(net, "cpu"), batches), verify.run_all(run, batches),
                       fmt=backend, inputs="seeded random inputs")
    meta["verification"] = verify.check(v, f"{backend} (in memory)").to_dict()
    return Predictor(model_id=model_id, metadata=meta, backend=backend, run=run)


def checkpoint_file(path: Path) -> Path:
    """The checkpoint a path names: the file itself, or a run folder's ``best.pt`` (else ``last.pt``)."""
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise HeadstartError(f"{path} is neither an export folder (no {CONFIG}) nor a run folder (no best.pt)")
    if not path.exists():
        raise HeadstartError(f"{path} does not exist: give a run folder, a .pt checkpoint or an export folder")
    return path


def checkpoint_metadata(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """What an export's config.json would say about this checkpoint's model (no card, no verification)."""
    from .card import model_card

    meta = {
        "arch": ckpt["arch"],
        "source": ckpt.get("source", "torchvision"),
        "num_classes": int(ckpt["num_classes"]),
        "classes": list(ckpt["classes"]),
        "kind": ckpt.get("kind", "photo"),
        "preprocessing": dict(ckpt["preprocessing"]),
        "head": dict(ckpt["head"]),
        "arch_options": dict(ckpt.get("arch_options") or {}),
        "model_format": "checkpoint",
        "verification": None,
    }
    run_dir = path.parent if (path.parent / "summary.json").is_file() else None
    meta["card"] = model_card(meta, ckpt, run_dir)
    return meta


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:6]


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:6]


# ---------------------------------------------------------------------- engines


def torch_runner(model: Any, device: str) -> Runner:
    """Logits from a PyTorch module (a headstart Network or a plain library model)."""
    import torch

    from headstart.runtime import pick_device

    dev = pick_device(device)
    model = model.to(dev).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(dev)).float().cpu().numpy()

    return run


def torchscript_runner(data: bytes, device: str) -> Runner:
    """Logits from a TorchScript file's bytes (``torch.jit.load``: no Python class needed)."""
    import io

    import torch

    from headstart.runtime import pick_device

    dev = pick_device(device)
    try:
        with warnings.catch_warnings():  # torch announces TorchScript's deprecation on every load
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location=dev).eval()
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise HeadstartError(f"cannot load the TorchScript model: {str(e).strip().splitlines()[0][:200]}") from None
    return torch_runner(module, device)


def onnx_session(data: bytes, device: str = "cpu", *, threads: int | None = None) -> Any:
    """An ONNX Runtime session for model bytes, on the CPU (or CUDA where ORT has it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise HeadstartError("running ONNX models needs onnxruntime: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise HeadstartError("this onnxruntime has no CUDA support: use --device cpu, "
                                 "or pip install onnxruntime-gpu")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise HeadstartError(f"ONNX Runtime cannot load the model: {str(e).strip().splitlines()[0][:200]}") from None


def onnx_runner(data: bytes, device: str = "cpu", *, threads: int | None = None) -> Runner:
    """Logits from ONNX model bytes through ONNX Runtime."""
    session = onnx_session(data, device, threads=threads)
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return run


def library_runner(meta: dict[str, Any], data: bytes, device: str) -> Runner:
    """Logits from a safetensors export, loaded into the plain torchvision/timm model."""
    from safetensors.torch import load as load_safetensors

    from .library import build_library_model

    model = build_library_model(meta)
    model.load_state_dict(load_safetensors(data))
    return torch_runner(model, device)
