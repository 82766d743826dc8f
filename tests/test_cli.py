"""Tests for the ``headstart`` command line, driven in-process through ``main(argv) -> int``.

Random-weight models at 32 px, the bundled digits or tiny image folders made here; nothing is
downloaded (TORCH_HOME points into tmp_path).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from headstart.cli.main import build_parser, main, resolve_config
from headstart.config import load_yaml
from headstart.errors import HeadstartError

COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "fox": (50, 60, 220), "wolf": (200, 200, 40)}
CSV_COLUMNS = ["global_epoch", "stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5",
               "seconds", "images_per_s", "lr_head"]


@contextlib.contextmanager
def _quiet_threads():
    # The CPUs are shared: one intra-op thread avoids oversubscription stalls (10x slower steps).
    # main() reconfigures the root logger (force=True): put pytest's handlers back afterwards.
    threads = torch.get_num_threads()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    torch.set_num_threads(1)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "feature-cache"))
    with _quiet_threads():
        yield


def make_folder(root: Path, classes, per_class: int = 8, size: int = 24, seed: int = 0) -> Path:
    """``per_class`` noisy solid-colour PNGs per class in ``root/<class>/`` (learnable by colour)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-25, 25, (size, size, 3))
            arr = np.clip(np.array(COLOURS[c]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}_{i}.png")
    return root


def train_argv(out: Path, name: str, *extra: str, data: str | Path = "digits") -> list[str]:
    return ["train", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--data", str(data),
            "--limit-train", "64", "--limit-val", "32", "--batch-size", "16", "--epochs", "1",
            "--no-progress", "--device", "cpu", "--workers", "0", "--output", str(out), "--name", name,
            "--cache-dir", str(out / "cache"), *extra]


def run_captured(argv: list[str]) -> tuple[int, str, str]:
    """main() with stdout/stderr captured, for module-scoped fixtures (no capsys there)."""
    out, err = io.StringIO(), io.StringIO()
    with _quiet_threads(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_user_error(rc: int, err: str, *fragments: str, one_line: bool = True) -> str:
    """Exit status 2, no traceback, ``headstart: error: ...`` naming ``fragments`` (on one line)."""
    assert rc == 2
    lines = err.strip().splitlines()
    if one_line:
        assert len(lines) == 1, err
    else:  # known multi-line messages (see test_error_message_is_one_line): check the first line
        lines = [" ".join(lines)]
    assert lines[0].startswith("headstart: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One head epoch and one fine-tuning epoch on 64 digits: (run folder, rc, stdout)."""
    out = tmp_path_factory.mktemp("digits")
    rc, stdout, _ = run_captured(train_argv(out, "run", "--finetune-epochs", "1", "--lr", "0.003",
                                            "--finetune-lr", "0.0002", "--seed", "7"))
    return out / "run", rc, stdout


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "pets", ["cat", "dog", "fox"])


@pytest.fixture(scope="module")
def pets_run(tmp_path_factory, pets) -> Path:
    out = tmp_path_factory.mktemp("pets-runs")
    rc, _, err = run_captured(train_argv(out, "pets", "--lr", "0.01", "--val-split", "0.25", data=pets))
    assert rc == 0, err
    return out / "pets"


# ---------------------------------------------------------------------- inspect and models


def test_inspect_vgg16_shows_new_head_and_parameter_totals(capsys):
    assert main(["inspect", "vgg16", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "Linear(in_features=4096, out_features=10, bias=True)" in out
    assert "out_features=1000" not in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1:] == ["134,301,514", "119,586,826"]
    assert "weights none" in out


def test_inspect_plan_shows_stages_and_frozen_groups(capsys):
    argv = ["inspect", "resnet18", "--num-classes", "3", "--freeze", "first:2", "--finetune-epochs", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plan = out.split("== training plan")[1].splitlines()[1:]
    stage_lines = [i for i, line in enumerate(plan) if line.startswith("stage ")]
    assert len(stage_lines) == 2
    assert plan[stage_lines[0]].startswith("stage 1: head") and "freeze first:2" in plan[stage_lines[0]]
    assert plan[stage_lines[1]].startswith("stage 2: finetune")
    caches = [line for line in plan if line.strip().startswith("feature cache:")]
    assert "first 5 of 10 body steps (up to layer1)" in caches[0]  # stem and layer1 run once
    assert "none" in caches[1]
    plan = [line for line in plan if line not in caches]
    stage_lines = [i for i, line in enumerate(plan) if line.startswith("stage ")]
    stage1 = {line.split()[0]: line.split()[1] for line in plan[stage_lines[0] + 1: stage_lines[1]]}
    assert stage1 == {"stem": "frozen", "layer1": "frozen", "layer2": "lr", "layer3": "lr", "layer4": "lr",
                      "head": "lr"}
    stage2 = {line.split()[0]: line.split()[1] for line in plan[stage_lines[1] + 1:] if line.strip()}
    assert set(stage2.values()) == {"lr"}  # fine-tuning unfreezes everything
    assert "Linear(in_features=512, out_features=3, bias=True)" in out


def test_models_lists_matching_backbones_with_parameter_counts(capsys):
    assert main(["models", "resnet"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split() and line.split()[0] == "resnet18")
    assert "11,689,512" in row and "IMAGENET1K_V1" in row
    names = [line.split()[0] for line in out.splitlines()[1:] if line.strip() and "model(s)" not in line]
    assert names and all("resnet" in n for n in names)
    assert f"{len(names)} model(s)" in out


def test_models_without_match_exits_2(capsys):
    assert main(["models", "nothing-matches"]) == 2
    assert_user_error(2, capsys.readouterr().err, "nothing-matches")


# ---------------------------------------------------------------------- user errors


@pytest.fixture(scope="module")
def resnet34_file(tmp_path_factory) -> Path:
    from torchvision.models import resnet34

    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.save(resnet34().state_dict(), path)
    return path


def _error_case(case: str, tmp_path: Path, request) -> tuple[list[str], tuple[str, ...]]:
    base = train_argv(tmp_path, "err")
    if case == "unknown model":
        return base + ["--model", "resnet19"], ("unknown model 'resnet19'", "resnet18")
    if case == "unknown weights":
        return base + ["--weights", "IMAGENET1K_V9"], ("unknown weights 'IMAGENET1K_V9'", "IMAGENET1K_V1")
    if case == "missing weights file":
        return base + ["--weights", str(tmp_path / "nope.pth")], ("nope.pth does not exist",)
    if case == "weights of another architecture":
        path = request.getfixturevalue("resnet34_file")
        return base + ["--weights", str(path)], ("does not fit", "unexpected key(s)", "layer1.2.",
                                                 "missing key(s)")
    if case == "missing data folder":
        return base + ["--data", str(tmp_path / "no-such-folder")], ("no-such-folder does not exist",)
    if case == "one class":
        folder = make_folder(tmp_path / "lonely", ["cat"])
        return base + ["--data", str(folder)], ("only one class", "cat")
    if case == "unknown --set key":
        return base + ["--set", "nope=1"], ("unknown config key nope",)
    if case == "bad --set value":
        return base + ["--set", "train.epochs=many"], ("train.epochs", "many")
    if case == "bad yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n")
        return base + ["--config", str(bad)], ("bad.yaml is not valid YAML",)
    if case == "unknown yaml key":
        cfg = tmp_path / "typo.yaml"
        cfg.write_text("train:\n  epoch: 2\n")
        return base + ["--config", str(cfg)], ("train.epoch",)
    if case == "missing config file":
        return base + ["--config", str(tmp_path / "absent.yaml")], ("absent.yaml does not exist",)
    raise AssertionError(case)


MULTI_LINE: set[str] = set()
ERROR_CASES = ["unknown model", "unknown weights", "missing weights file", "weights of another architecture",
               "missing data folder", "one class", "unknown --set key", "bad --set value", "bad yaml",
               "unknown yaml key", "missing config file"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys, request):
    argv, fragments = _error_case(case, tmp_path, request)
    rc = main(argv)
    assert_user_error(rc, capsys.readouterr().err, *fragments, one_line=case not in MULTI_LINE)
    assert not (tmp_path / "err" / "best.pt").exists()


def _garbage_checkpoint(tmp_path: Path) -> list[str]:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage" * 50)
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    return ["predict", str(bad), str(img), "--device", "cpu"]


@pytest.mark.parametrize("case", ["bad yaml", "garbage checkpoint"])
def test_error_message_is_one_line(case, tmp_path, capsys, request):
    if case == "garbage checkpoint":
        argv, fragments = _garbage_checkpoint(tmp_path), ("cannot read checkpoint",)
    else:
        argv, fragments = _error_case(case, tmp_path, request)
    assert_user_error(main(argv), capsys.readouterr().err, *fragments)


@pytest.mark.parametrize("case", ["unknown model", "weights of another architecture", "one class",
                                  "unknown --set key"])
def test_debug_lets_the_exception_through(case, tmp_path, request, capsys):
    argv, fragments = _error_case(case, tmp_path, request)
    with pytest.raises(HeadstartError) as info:
        main(["--debug", *argv])
    assert fragments[0] in str(info.value)


# ---------------------------------------------------------------------- train


def test_train_end_to_end_writes_the_run_folder(digits_run):
    run, rc, out = digits_run
    assert rc == 0
    names = {p.name for p in run.iterdir()}
    assert {"best.pt", "config.yaml", "last.pt", "metrics.csv", "metrics.jsonl", "summary.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    cfg = load_yaml(run / "config.yaml")
    assert cfg.train.lr == 0.003 and cfg.train.finetune_lr == 0.0002 and cfg.train.seed == 7
    assert cfg.model.name == "resnet18" and cfg.model.input_size == 32 and cfg.data.limit_train == 64

    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert [(r["global_epoch"], r["stage"], r["epoch"]) for r in rows] == [("1", "head", "1"),
                                                                           ("2", "finetune", "1")]
    assert float(rows[0]["lr_head"]) > 0 and 0 <= float(rows[1]["val_acc"]) <= 1

    jrows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in jrows] == ["head", "finetune"]
    assert set(jrows[0]["lrs"]) == {"head"}
    assert set(jrows[1]["lrs"]) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}

    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_accuracy"] == max(r["val_acc"] for r in jrows)
    assert summary["epochs"] == 2 and summary["model"] == "resnet18"
    assert summary["classes"] == list("0123456789")
    assert set(summary["stages"]) == {"head", "finetune"}

    # fine-tuning keeps BatchNorm statistics by default (train.finetune_bn = eval-all): still the initial ones
    last = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    assert torch.equal(last["body.bn1.running_var"], torch.ones(64))
    assert int(last["body.bn1.num_batches_tracked"]) == 0

    assert "stage 1/2: head" in out and "stage 2/2: finetune" in out
    assert f"model saved to {run / 'best.pt'}" in out
    assert "64 train / 32 validation images" in out


def test_config_file_and_flags_flag_wins(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "model": {"name": "resnet18", "weights": "none", "input_size": 32},
        "data": {"source": "digits", "limit_train": 64, "limit_val": 32, "batch_size": 16, "workers": 0},
        "train": {"epochs": 1, "lr": 0.5, "optimizer": "sgd", "scheduler": "onecycle", "label_smoothing": 0.1,
                  "progress": False, "device": "cpu"},
        "cache": {"dir": str(tmp_path / "cache")},
        "output": str(tmp_path / "from-file"),
        "name": "cfg",
    }))
    argv = ["train", "--config", str(cfg_file), "--lr", "0.02", "--output", str(tmp_path), "--set",
            "train.weight_decay=0.001"]
    assert main(argv) == 0
    saved = load_yaml(tmp_path / "cfg" / "config.yaml")
    assert saved.train.lr == 0.02  # the flag beats the file
    assert saved.train.weight_decay == 0.001
    assert saved.train.optimizer == "sgd" and saved.train.scheduler == "onecycle"
    assert saved.train.label_smoothing == 0.1
    assert saved.data.limit_train == 64
    assert not (tmp_path / "from-file").exists()
    opt = torch.load(tmp_path / "cfg" / "last.pt", weights_only=True)["train_state"]["optimizer"]
    assert opt["param_groups"][0]["nesterov"] is True  # sgd really ran
    assert "stage 1/1: head" in capsys.readouterr().out


def test_resolve_config_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 0.5\n  epochs: 9\nhead:\n  kind: mlp\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--lr", "0.1",
                                      "--set", "train.lr=0.2", "--hidden", "32,16"])
    cfg = resolve_config(args)
    assert cfg.train.lr == 0.2  # --set beats flags beat the file
    assert cfg.train.epochs == 9 and cfg.head.kind == "mlp" and cfg.head.hidden == [32, 16]


# ---------------------------------------------------------------------- eval


def test_eval_run_folder_on_digits(digits_run, capsys):
    run, rc, _ = digits_run
    assert rc == 0
    assert main(["eval", str(run), "--data", "digits", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert f"top-1 {report['top1']:.2%}" in out
    assert re.search(r"class\s+precision\s+recall\s+f1\s+support", out)
    assert "confusion matrix (rows: true class, columns: predicted)" in out
    assert report["classes"] == list("0123456789") and len(report["per_class"]) == 10
    n = sum(c["support"] for c in report["per_class"])
    assert n == 360  # digits' whole validation split (20% of 1,797), not the training limit
    cm = np.array(report["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == n
    assert report["top1"] == pytest.approx(np.trace(cm) / n)
    with (run / "eval" / "confusion_matrix.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", *"0123456789"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == cm.tolist()


def test_eval_folder_with_unknown_classes_exits_2(pets_run, tmp_path, capsys):
    other = make_folder(tmp_path / "other", ["cat", "wolf"], per_class=2)
    assert main(["eval", str(pets_run / "best.pt"), "--data", str(other), "--device", "cpu"]) == 2
    line = assert_user_error(2, capsys.readouterr().err, "'wolf'")
    assert "['cat', 'dog', 'fox']" in line


def test_eval_folder_with_a_subset_of_the_classes(pets_run, tmp_path, capsys):
    subset = make_folder(tmp_path / "subset", ["fox", "cat"], per_class=3, seed=1)
    out_dir = tmp_path / "report"
    assert main(["eval", str(pets_run / "best.pt"), "--data", str(subset), "--device", "cpu",
                 "--output", str(out_dir)]) == 0
    report = json.loads((out_dir / "eval.json").read_text())
    assert report["classes"] == ["cat", "dog", "fox"]
    assert [c["support"] for c in report["per_class"]] == [3, 0, 3]
    assert np.array(report["confusion"]).sum() == 6
    assert "saved" in capsys.readouterr().out


# ---------------------------------------------------------------------- predict


def test_predict_formats(pets_run, pets, capsys):
    ckpt = str(pets_run / "best.pt")
    n = 24
    assert main(["predict", ckpt, str(pets), "--format", "json", "--top-k", "2", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == n
    assert {Path(r["file"]).parent.name for r in results} == {"cat", "dog", "fox"}
    for r in results:
        assert len(r["top"]) == 2
        assert {t["class"] for t in r["top"]} <= {"cat", "dog", "fox"}
        p = [t["probability"] for t in r["top"]]
        assert p[0] >= p[1] > 0 and sum(p) <= 1 + 1e-6

    assert main(["predict", ckpt, str(pets / "cat"), str(pets / "dog" / "dog_0.png"), "--format", "csv",
                 "--top-k", "2", "--device", "cpu"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["file", "rank", "class", "probability"]
    assert len(rows) == 1 + 9 * 2
    assert [r[1] for r in rows[1:3]] == ["1", "2"] and all(0 < float(r[3]) <= 1 for r in rows[1:])

    assert main(["predict", ckpt, str(pets / "fox"), "--top-k", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("file") and "top classes" in lines[0]  # the table has a header row
    lines = lines[1:]
    assert len(lines) == 8
    assert all(len(re.findall(r"\b(cat|dog|fox) \d+\.\d%", line)) == 2 for line in lines)


def test_predict_top_k_is_capped_at_the_class_count(pets_run, pets, capsys):
    assert main(["predict", str(pets_run / "best.pt"), str(pets / "cat" / "cat_1.png"), "--format", "json",
                 "--top-k", "10", "--device", "cpu"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert sorted(t["class"] for t in result["top"]) == ["cat", "dog", "fox"]
    assert sum(t["probability"] for t in result["top"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_skips_a_corrupt_image_and_strict_exits_2(pets_run, pets, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((pets / "cat" / "cat_0.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    assert main(["predict", str(pets_run / "best.pt"), str(folder), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "good.png" in out and "broken.png" not in out
    assert "skipped" in err and "broken.png" in err and "1 unreadable image(s) skipped, 1 predicted" in err
    assert main(["predict", str(pets_run / "best.pt"), str(folder), "--device", "cpu", "--strict"]) == 2
    assert_user_error(2, capsys.readouterr().err, "broken.png")


def test_predict_with_a_garbage_checkpoint_exits_2(tmp_path, capsys):
    rc = main(_garbage_checkpoint(tmp_path))
    assert_user_error(rc, capsys.readouterr().err, "cannot read checkpoint", "model.pt", one_line=False)
