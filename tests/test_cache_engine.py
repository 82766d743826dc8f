"""``cache.engine``: the frozen body's features for the cache through ONNX Runtime, verified against PyTorch.

Random-weight resnet18 at 32 px on 64 bundled digits (as in test_engine.py), one head epoch;
the ONNX body is built for real (export + ONNX Runtime), nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import headstart as hs
from headstart.config import RunConfig, apply_overrides, validate
from headstart.deploy import convert
from headstart.deploy.features import AUTO_MIN_PIXELS, FastBody, body_engine
from headstart.errors import HeadstartError
from headstart.jobs.train import prepare
from headstart.training.cache import make_key
from headstart.training.fit import fit

pytest.importorskip("onnxruntime")


def tiny_cfg(tmp_path: Path, **overrides) -> RunConfig:
    base = {
        "model.name": "resnet18", "model.weights": "none", "model.input_size": 32,
        "data.source": "digits", "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16,
        "data.augment": False, "train.epochs": 1, "train.finetune_epochs": 0, "train.progress": False,
        "train.device": "cpu", "cache.dir": str(tmp_path / "cache"), "output": str(tmp_path / "runs"),
        "name": "run",
    }
    return apply_overrides(RunConfig(), base | overrides)


def cached_run(cfg: RunConfig, engine) -> tuple[list[str], dict[str, np.ndarray], dict[str, dict]]:
    """Fit one head epoch with ``engine``: the console lines and each cache entry's features and description."""
    net, data = prepare(cfg)
    lines: list[str] = []
    fit(net, data, cfg, say=lines.append, body_engine=engine)
    feats, metas = {}, {}
    for meta in Path(cfg.cache.dir).glob("*/view0.json"):
        feats[meta.parent.name] = np.load(meta.parent / "view0.npy")
        metas[meta.parent.name] = json.loads(meta.read_text())
    return lines, feats, metas


def by_source(feats: dict[str, np.ndarray], metas: dict[str, dict]) -> dict[str, np.ndarray]:
    return {metas[k]["source"]: v for k, v in feats.items()}


def test_onnx_features_equal_pytorch_within_tolerance_and_are_kept_apart(tmp_path):
    torch_lines, torch_feats, torch_metas = cached_run(tiny_cfg(tmp_path), None)
    lines, feats, metas = cached_run(tiny_cfg(tmp_path, **{"cache.dir": str(tmp_path / "c2")}), body_engine("onnx"))
    assert not set(feats) & set(torch_feats)  # other keys: never mixed with PyTorch's entries
    assert {m["engine"] for m in metas.values()} == {"onnx"}
    assert {m["engine"] for m in torch_metas.values()} == {"torch"}
    mine, theirs = by_source(feats, metas), by_source(torch_feats, torch_metas)
    assert mine.keys() == theirs.keys() == {"features val", "features train view 0"}
    for k in mine:
        assert np.allclose(mine[k], theirs[k], atol=1e-4, rtol=1e-4)
    note = [x for x in lines if "features extracted by" in x]
    assert len(note) == 1 and "ONNX Runtime, verified" in note[0] and "within" in note[0]
    assert not any("features extracted by" in x for x in torch_lines)


def test_a_failed_verification_falls_back_to_pytorch_and_says_why(tmp_path, monkeypatch):
    _, torch_feats, torch_metas = cached_run(tiny_cfg(tmp_path), None)
    torch.manual_seed(123)  # not the run's seed: another random body
    other = hs.build_network("resnet18", weights="none", num_classes=10, input_size=32)
    real = convert.to_onnx
    monkeypatch.setattr(convert, "to_onnx", lambda _net, **kw: real(other, **kw))  # a body that differs
    lines, feats, metas = cached_run(tiny_cfg(tmp_path, **{"cache.dir": str(tmp_path / "c2")}),
                                     body_engine("onnx"))
    note = [x for x in lines if "features extracted by" in x]
    assert len(note) == 1 and "PyTorch (ONNX Runtime not used: its features differ by" in note[0]
    assert {m["engine"] for m in metas.values()} == {"torch"}  # what ran, under the key of what was asked
    mine, theirs = by_source(feats, metas), by_source(torch_feats, torch_metas)
    for k in mine:
        assert np.array_equal(mine[k], theirs[k])  # PyTorch's own features, bit for bit


def test_the_setting_picks_the_engine(tmp_path):
    net = hs.build_network("resnet18", weights="none", num_classes=3, input_size=32)
    assert body_engine("torch") is None
    cpu = torch.device("cpu")
    onnx = body_engine("onnx")
    assert isinstance(onnx(net, cpu, None, 10), FastBody)  # "onnx" tries it even where it does not pay
    auto = body_engine("auto")
    enough = AUTO_MIN_PIXELS // 32**2 + 1
    assert isinstance(auto(net, cpu, None, enough), FastBody)
    assert auto(net, cpu, None, enough - 2) is None  # too few pixels to pay for the export
    assert auto(net, cpu, torch.bfloat16, enough) is None  # autocast: the ONNX body is fp32
    assert auto(net, torch.device("cuda"), None, enough) is None  # a GPU runs PyTorch natively


def test_torch_engine_keeps_the_keys_entries_had_before(tmp_path):
    net, data = prepare(tiny_cfg(tmp_path))
    args = (net, "fp", data.val, data.kind, 0, 0)
    assert make_key(*args) == make_key(*args, engine="torch") != make_key(*args, engine="onnx")


def test_the_job_hands_the_setting_down_and_torch_turns_it_off(tmp_path, monkeypatch):
    from headstart.deploy import features

    monkeypatch.setattr(features, "AUTO_MIN_PIXELS", 1)  # the digits are few: make auto take them
    lines: list[str] = []
    hs.train(tiny_cfg(tmp_path, **{"cache.engine": "auto", "report": False, "tensorboard": False}),
             say=lines.append)
    assert any("features extracted by ONNX Runtime, verified" in x for x in lines)
    lines.clear()
    hs.train(tiny_cfg(tmp_path, **{"cache.engine": "torch", "report": False, "tensorboard": False,
                                   "name": "run2"}), say=lines.append)
    assert not any("features extracted by" in x for x in lines)


def test_a_bad_engine_is_refused():
    cfg = RunConfig()
    cfg.cache.engine = "tensorrt"
    with pytest.raises(HeadstartError, match="cache.engine"):
        validate(cfg)
