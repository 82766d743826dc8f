"""Exports (ONNX, TorchScript, library-keyed safetensors), their verification, int8, and predictors.

Tiny random-weight models at 32 px (timm's ``test_vit`` at its fixed 160 px) on image folders made
in tmp_path. A run folder here is what training leaves: ``best.pt`` with the run config inside,
plus ``summary.json``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import headstart as hs
from headstart.config import HeadConfig, RunConfig, to_dict
from headstart.deploy import convert
from headstart.deploy.apply import evaluate_folder, predict_images
from headstart.deploy.commands import add_export_parser, evaluate_export, is_export, predict_export, run_export
from headstart.deploy.export import export_model
from headstart.deploy.library import build_library_model
from headstart.deploy.runtime import open_predictor
from headstart.errors import HeadstartError
from headstart.models import model_record

CLASSES = ["cat", "dog", "owl"]
FAMILIES = ["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "timm:test_vit",
            "timm:tf_efficientnet_lite0"]
FORMATS = ["onnx", "torchscript", "safetensors"]


@pytest.fixture
def data(tmp_path):
    """train/ and val/ folders of 3 classes; each class's images share a tint, so a model can tell them apart."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 5), ("val", 3)):
        for k, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 120, (36, 44, 3)).astype(np.uint8)
                a[..., k] += 120
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    return root


def make_run(tmp_path, data, name="resnet18", *, head="replace", decisive=False, summary=True):
    """A run folder holding best.pt (record + run config) and summary.json, for a random-weight model."""
    torch.manual_seed(0)
    size = None if name == "timm:test_vit" else 32
    net = hs.build_network(name, weights="none", input_size=size)
    net.replace_head(len(CLASSES), HeadConfig(kind=head, hidden=[8] if head == "mlp" else []))
    if decisive:  # large, well-separated logits: int8 rounding cannot flip the answer
        with torch.no_grad():
            for p in net.head.parameters():
                p.mul_(50)
    cfg = RunConfig()
    cfg.model.name, cfg.model.weights, cfg.data.source = name, "none", str(data)
    record = model_record(net, CLASSES) | {"config": to_dict(cfg)}
    run = tmp_path / f"run-{name.replace(':', '-')}-{head}"
    run.mkdir()
    torch.save(record, run / "best.pt")
    if summary:
        counts = {"train": {c: 5 for c in CLASSES}, "val": {c: 3 for c in CLASSES}}
        (run / "summary.json").write_text(json.dumps({
            "model": name, "weights": "none", "data": str(data), "classes": CLASSES, "class_counts": counts,
            "best_val_accuracy": 0.5, "final_val_accuracy": 0.4444, "final_val_top5": 1.0}))
    return run, net.eval()


def batch_of(predictor, folder):
    from headstart.data import list_images, load_image

    return np.stack([predictor.preprocess(load_image(p)) for p in list_images(folder)])


# ------------------------------------------------------------------ parity of every format


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FAMILIES)
def test_export_matches_the_checkpoint(tmp_path, data, name, fmt):
    run, _ = make_run(tmp_path, data, name)
    out = export_model(run, fmt, say=lambda _: None)
    meta = json.loads((out / "config.json").read_text())
    v = meta["verification"]
    assert v["passed"] and v["images"] == 9 and v["max_abs_diff"] <= v["tolerance_max_abs"]
    assert meta["classes"] == CLASSES and meta["model_format"] == fmt
    assert (out / meta["model_file"]).is_file() and (out / "README.md").is_file()
    exported, original = open_predictor(out), open_predictor(run)
    x = batch_of(original, data / "val")
    assert np.allclose(exported.logits(x), original.logits(x), rtol=1e-4, atol=v["tolerance_max_abs"])
    assert exported.metadata["card"] and exported.model_id.startswith(meta["arch"])


def test_onnx_has_a_dynamic_batch_axis_and_states_its_opset(tmp_path, data):
    import onnx

    run, _ = make_run(tmp_path, data)
    out = export_model(run, "onnx", say=lambda _: None)
    model = onnx.load(str(out / "model.onnx"))
    meta = json.loads((out / "config.json").read_text())
    assert meta["onnx"]["opset"] == convert.OPSET == model.opset_import[0].version
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    p = open_predictor(out)
    for n in (1, 5):  # any batch size runs
        assert p.logits(np.zeros((n, 3, 32, 32), np.float32)).shape == (n, 3)


@pytest.mark.slow
def test_the_torch_export_based_onnx_exporter_also_verifies(tmp_path, data):
    run, _ = make_run(tmp_path, data)
    out = export_model(run, "onnx", exporter="dynamo", say=lambda _: None)
    meta = json.loads((out / "config.json").read_text())
    assert meta["onnx"]["exporter"] == "dynamo" and meta["verification"]["passed"]


# ------------------------------------------------------------------ safetensors under the library's names


@pytest.mark.parametrize("name,head", [("resnet18", "replace"), ("mobilenet_v2", "linear"),
                                       ("efficientnet_b0", "replace"), ("timm:tf_efficientnet_lite0", "replace")])
def test_safetensors_load_strictly_into_the_plain_library_model(tmp_path, data, name, head):
    from safetensors.torch import load_file

    run, net = make_run(tmp_path, data, name, head=head)
    out = export_model(run, "safetensors", say=lambda _: None)
    state = load_file(str(out / "model.safetensors"))
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], num_classes=3)
    else:
        import torchvision

        model = torchvision.models.get_model(name, num_classes=3)
    model.load_state_dict(state)  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), net(x), atol=1e-5)
    assert json.loads((out / "config.json").read_text())["library"]["head"] == "library"


@pytest.mark.parametrize("name,head", [("resnet18", "mlp"), ("convnext_tiny", "linear")])
def test_a_head_that_is_not_the_librarys_is_said_and_stored_apart(tmp_path, data, name, head):
    import torchvision
    from safetensors.torch import load_file

    run, net = make_run(tmp_path, data, name, head=head)
    out = export_model(run, "safetensors", say=lambda _: None)
    spec = json.loads((out / "config.json").read_text())["library"]
    assert spec["head"] == "custom" and spec["head_layers"][-1]["type"] == "Linear"
    card = (out / "README.md").read_text()
    assert "is not torchvision's own classifier" in card
    assert f"model.{spec['classifier']} = torch.nn.Sequential(" in card
    model = torchvision.models.get_model(name, num_classes=3)
    # the card's line, executed: the plain model gets headstart's head in place of its classifier
    line = next(s for s in card.splitlines() if s.startswith(f"model.{spec['classifier']} = "))
    exec(line.split("  #")[0], {"torch": torch, "model": model})
    model.load_state_dict(load_file(str(out / "model.safetensors")))  # strict
    head_only = load_file(str(out / "head.safetensors"))
    assert set(head_only) == {k for k in net.head.state_dict()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), net(x), atol=1e-5)


@pytest.mark.slow
def test_safetensors_of_a_vit_at_another_input_size(tmp_path, data):
    run, net = make_run(tmp_path, data, "vit_b_32")
    out = export_model(run, "safetensors", say=lambda _: None)
    spec = json.loads((out / "config.json").read_text())["library"]
    assert spec["kwargs"] == {"image_size": 32} and spec["classifier"] == "heads"
    assert "image_size=32" in (out / "README.md").read_text()


# ------------------------------------------------------------------ verification


def test_a_wrong_export_fails_verification_and_writes_nothing(tmp_path, data, monkeypatch):
    run, net = make_run(tmp_path, data)
    other = hs.build_network("resnet18", weights="none", num_classes=3, input_size=32)  # other weights
    real = convert.to_onnx
    monkeypatch.setattr(convert, "to_onnx", lambda _net, **kw: real(other, **kw))
    with pytest.raises(HeadstartError, match=r"failed verification.*max \|logit diff\| .* top-1 agreement"):
        export_model(run, "onnx", say=lambda _: None)
    assert not (run / "export-onnx").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".export")]  # no temporary folder left


def test_check_images_replace_the_validation_split(tmp_path, data):
    run, _ = make_run(tmp_path, data)
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(loose / f"{i}.jpg")
    out = export_model(run, "torchscript", check_images=loose, say=lambda _: None)
    v = json.loads((out / "config.json").read_text())["verification"]
    assert v["images"] == 4 and "--check-images" in v["inputs"]


def test_a_run_whose_data_is_gone_asks_for_check_images(tmp_path, data):
    import shutil

    run, _ = make_run(tmp_path, data)
    shutil.rmtree(data)
    with pytest.raises(HeadstartError, match="--check-images"):
        export_model(run, "onnx", say=lambda _: None)


def test_cli_flags_reach_the_export(tmp_path, data):
    import argparse

    run, _ = make_run(tmp_path, data)
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "ts")])
    assert run_export(args) == 0 and is_export(tmp_path / "ts")
    with pytest.raises(HeadstartError, match="--int8 .* --format onnx"):
        run_export(parser.parse_args(["export", str(run), "--format", "torchscript", "--int8"]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(HeadstartError, match="not a headstart export"):
        run_export(parser.parse_args(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "busy")]))


# ------------------------------------------------------------------ int8


def test_int8_measures_static_and_dynamic_and_keeps_one(tmp_path, data):
    run, _ = make_run(tmp_path, data, "mobilenet_v2", decisive=True)
    out = export_model(run, "onnx", int8=True, say=lambda _: None)
    meta = json.loads((out / "config.json").read_text())
    q = meta["int8"]
    assert meta["precision"] == "int8" and meta["model_file"] == "model.int8.onnx"
    assert {c["method"] for c in q["candidates"]} == {"static", "dynamic"}
    assert q["method"] in ("static", "dynamic") and q["calibration_images"] == 15
    assert q["calibration"] == "percentile"  # the default: ranges from histograms, one batch at a time
    chosen = next(c for c in q["candidates"] if c["method"] == q["method"])
    assert chosen["top1"] is not None and chosen["speedup"] > 0
    assert meta["verification"]["format"] == "onnx-int8" and meta["verification"]["top1_agreement"] >= 0.9
    assert "## int8" in (out / "README.md").read_text()
    assert open_predictor(out).logits(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 3)


def test_int8_calibration_is_a_flag_recorded_in_the_export(tmp_path, data):
    import argparse

    run, _ = make_run(tmp_path, data, "mobilenet_v2", decisive=True)
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    run_export(parser.parse_args(["export", str(run), "--format", "onnx", "--int8", "--int8-calibration", "minmax",
                                  "--calibration-images", "8"]))
    meta = json.loads((run / "export-onnx-int8" / "config.json").read_text())
    assert meta["int8"]["calibration"] == "minmax" and meta["int8"]["calibration_images"] == 8
    assert "(minmax activation ranges)" in (run / "export-onnx-int8" / "README.md").read_text()
    with pytest.raises(HeadstartError, match="unknown int8 calibration 'kl'.*percentile, minmax, entropy"):
        export_model(run, "onnx", tmp_path / "other", int8=True, calibration="kl", say=lambda _: None)
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------ predictors


def test_a_checkpoint_served_through_onnx_is_verified_in_memory(tmp_path, data):
    run, _ = make_run(tmp_path, data)
    torch_p, onnx_p = open_predictor(run), open_predictor(run / "best.pt", backend="onnx")
    assert onnx_p.backend == "onnx" and onnx_p.metadata["verification"]["passed"]
    assert torch_p.model_id == onnx_p.model_id  # the same model file
    x = batch_of(torch_p, data / "val")
    assert np.allclose(onnx_p.logits(x), torch_p.logits(x), atol=1e-4)
    assert torch_p.preprocess(Image.new("L", (50, 70))).shape == (3, 32, 32)  # any mode, the model's size
    with pytest.raises(HeadstartError, match=r"batches of shape \(N, 3, 32, 32\)"):
        torch_p.logits(np.zeros((1, 3, 16, 16), np.float32))


def test_an_export_runs_only_on_its_own_engine(tmp_path, data):
    run, _ = make_run(tmp_path, data)
    out = export_model(run, "onnx", say=lambda _: None)
    with pytest.raises(HeadstartError, match="--backend onnx"):
        open_predictor(out, backend="torch")
    ts = export_model(run, "torchscript", say=lambda _: None)
    assert open_predictor(ts, backend="torch").backend == "torchscript"
    with pytest.raises(HeadstartError, match="neither an export folder"):
        open_predictor(tmp_path)


def test_predict_and_eval_from_an_export_give_the_checkpoints_answers(tmp_path, data):
    run, _ = make_run(tmp_path, data, "mobilenet_v2")
    out = export_model(run, "onnx", say=lambda _: None)
    (run / "best.pt").rename(tmp_path / "elsewhere.pt")  # the export needs nothing from the run
    mine = predict_export(out, [str(data / "val")], top_k=2)
    theirs = hs.predict(tmp_path / "elsewhere.pt", [data / "val"], top_k=2, device="cpu")
    assert [r["file"] for r in mine] == [r["file"] for r in theirs]
    for a, b in zip(mine, theirs):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert np.allclose([t["probability"] for t in a["top"]], [t["probability"] for t in b["top"]], atol=1e-5)
    report = evaluate_export(out, str(data))
    reference = hs.evaluate_checkpoint(tmp_path / "elsewhere.pt", str(data), device="cpu")
    assert report.top1 == reference.top1 and torch.equal(report.confusion, reference.confusion)


def test_predictor_functions_accept_checkpoints_too(tmp_path, data):
    run, _ = make_run(tmp_path, data)
    p = open_predictor(run)
    results = predict_images(p, [data / "val" / "cat"], top_k_count=5)
    assert len(results) == 3 and len(results[0]["top"]) == 3  # top-k is capped at the class count
    assert abs(sum(t["probability"] for t in results[0]["top"]) - 1) < 1e-6
    assert sum(evaluate_folder(p, str(data / "val")).support) == 9


# ------------------------------------------------------------------ the model card and the plain model


def test_the_card_holds_data_metrics_verification_loading_and_limits(tmp_path, data):
    run, _ = make_run(tmp_path, data)
    out = export_model(run, "onnx", say=lambda _: None)
    card = (out / "README.md").read_text()
    for needle in ("| cat | 5 | 3 |", "**total** | **15** | **9**", "top-1 **44.44%**", "| class | precision",
                   "largest absolute logit difference", "onnxruntime.InferenceSession(\"model.onnx\")",
                   "## Limits", "random weights", "v2.CenterCrop(32)"):
        assert needle in card, needle
    meta = json.loads((out / "config.json").read_text())
    assert meta["evaluation"]["images"] == 9 and meta["input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["preprocessing"]["crop"] == 32 and meta["training"]["data"] == str(data)


def test_build_library_model_rebuilds_a_custom_head(tmp_path, data):
    run, net = make_run(tmp_path, data, "mobilenet_v2", head="mlp")
    out = export_model(run, "safetensors", say=lambda _: None)
    model = build_library_model(json.loads((out / "config.json").read_text()))
    assert isinstance(model.classifier, torch.nn.Sequential) and model.classifier[-1].out_features == 3


# ------------------------------------------------------------------ the frozen body through ONNX Runtime


def test_fast_body_switches_to_onnx_runtime_after_a_verified_first_batch():
    from headstart.deploy.features import fast_body

    torch.manual_seed(0)
    net = hs.build_network("mobilenet_v2", weights="none", num_classes=3, input_size=32).eval()
    body = fast_body(net)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)
    assert torch.equal(body(x1), net.features(x1))  # the first batch is PyTorch's own answer
    assert body.engine == "onnx" and "within" in body.reason
    assert torch.allclose(body(x2), net.features(x2), atol=1e-4)


def test_fast_body_falls_back_to_pytorch_when_the_onnx_body_differs(monkeypatch):
    from headstart.deploy.features import fast_body

    torch.manual_seed(0)
    net = hs.build_network("resnet18", weights="none", num_classes=3, input_size=32).eval()
    other = hs.build_network("resnet18", weights="none", num_classes=3, input_size=32)
    real = convert.to_onnx
    monkeypatch.setattr(convert, "to_onnx", lambda _net, **kw: real(other, **kw))
    body = fast_body(net)
    x = torch.randn(2, 3, 32, 32)
    body(x)
    assert body.engine == "torch" and "differ by" in body.reason
    assert torch.equal(body(x), net.features(x))
