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
import os
import re
import subprocess
import sys
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


# ---------------------------------------------------------------------- help and start-up


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_defaults(capsys):
    text = _help(capsys, "train")
    assert "--epochs N|auto epochs of the head stage, or auto: fit the head's final layer" in text
    assert "(default: auto) [train.epochs]" in text
    assert "--lr X|auto learning rate of the head stage, or auto" in text and "(default: 0.001) [train.lr]" in text
    assert "--hidden HIDDEN hidden sizes of an mlp head, comma-separated (512,256) (default: none)" in text
    assert "--no-cache compute a frozen body's features once" in text
    # The input size says what the default really is, digits included.
    assert "--input-size N square input size in pixels (default: the weights' crop size" in text
    assert "64 px for digits" in text
    text = _help(capsys, "predict")
    assert "--top-k TOP_K classes shown per image (default: 3)" in text and "(default: table)" in text
    assert "(default: 100)" in _help(capsys, "lr-find")  # --steps


def test_help_imports_no_torch():
    code = ("import sys\nfrom headstart.cli import main\n"
            "for argv in (['--help'], ['models', '--help'], ['train', '--help'], ['eval', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'PIL', 'onnxruntime'}))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


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


# Values refused before anything is made (issue 10): flag or YAML, each names its key in one line.
BAD_VALUES = {
    "--lr -1": (["--lr", "-1"], "train.lr (--lr) is -1.0"),
    "--lr nan": (["--lr", "nan"], "train.lr (--lr) is nan"),
    "--finetune-lr -1": (["--finetune-epochs", "1", "--finetune-lr", "-1"], "train.finetune_lr (--finetune-lr)"),
    "--input-size 0": (["--input-size", "0"], "model.input_size (--input-size) is 0"),
    "--workers -1": (["--workers", "-1"], "data.workers (--workers) is -1"),
    "--epochs -1": (["--epochs", "-1"], "train.epochs (--epochs) is -1"),
    "--finetune-epochs -1": (["--finetune-epochs", "-1"], "train.finetune_epochs"),
    "--batch-size 0": (["--batch-size", "0"], "data.batch_size"),
    "epochs: true": ("train:\n  epochs: true\n", "train.epochs: expected a whole number, got True"),
    "lr: .nan": ("train:\n  lr: .nan\n", "train.lr (--lr) is nan"),
    "optimizer: adam": ("train:\n  optimizer: adam\n", "give one of: adamw, radam, sgd"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_bad_value_is_refused_before_anything_is_written(case, tmp_path, capsys):
    given, words = BAD_VALUES[case]
    argv = train_argv(tmp_path, "err")
    if isinstance(given, str):  # a YAML config, without the flag that would override it
        (tmp_path / "run.yaml").write_text(given)
        if "epochs:" in given:
            i = argv.index("--epochs")
            argv = argv[:i] + argv[i + 2:]
        argv += ["--config", str(tmp_path / "run.yaml")]
    else:
        argv += given
    assert_user_error(main(argv), capsys.readouterr().err, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run.yaml"] if isinstance(given, str) else [])


@pytest.mark.parametrize("kind", ["binary file", "folder"])
def test_a_config_that_is_not_a_yaml_file_is_one_line(kind, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    if kind == "folder":
        config.mkdir()
    else:
        config.write_bytes(bytes(range(256)) * 4)
    rc = main(train_argv(tmp_path, "err", "--config", str(config)))
    assert_user_error(rc, capsys.readouterr().err, str(config))
    assert not (tmp_path / "err").exists()


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


@pytest.mark.parametrize("stage,flag", [(1, "--lr"), (2, "--finetune-lr")])
def test_lr_find_names_the_flag_of_its_stage_and_saves_beside_the_runs(stage, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the current folder
    argv = ["lr-find", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--limit-train", "32",
            "--limit-val", "16", "--batch-size", "16", "--workers", "0", "--no-progress", "--device", "cpu",
            "--finetune-epochs", "1", "--stage", str(stage), "--steps", "8", "--output", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plot = tmp_path / "runs" / "lr-find" / f"resnet18-digits-stage{stage}.png"
    assert plot.stat().st_size > 0 and f"plot saved to {plot}; use it with {flag} " in out
    assert re.findall(r"(?<![\w-])--(?:finetune-)?lr\b", out) == [flag, flag]  # "FLAG 0.01 (or FLAG auto ...)"
    assert not (tmp_path / "lr_find.png").exists()


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
    assert_matrix_lines_up(out, report["classes"], report["confusion"])
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


def assert_matrix_lines_up(text: str, classes: list[str], confusion: list[list[int]]) -> None:
    """The text confusion matrix: each count right-aligned under its column, each row's label once."""
    lines = text.split("confusion matrix (rows: true class, columns: predicted)")[1].splitlines()[1:]
    header, rows = lines[0], lines[1:len(classes) + 1]
    ends = [m.end() for m in re.finditer(r"\S+", header)]
    assert len(ends) == len(classes) and len(rows) == len(classes)
    for i, row in enumerate(rows):
        counts = list(re.finditer(r"\S+", row))[-len(classes):]
        assert [m.end() for m in counts] == ends, (header, row)
        assert [int(m.group()) for m in counts] == confusion[i]
        label = row[:counts[0].start()].split()
        assert classes[i] in " ".join(label) and label.count(str(i)) <= 1, row  # no index repeated


@pytest.mark.parametrize("classes", [["cat", "dog", "fox"], ["cat", "a rather long class name", "fox"],
                                     [f"c{i}" for i in range(12)], list("0123456789")])
def test_eval_text_confusion_matrix_lines_up(classes):
    from headstart.evaluation import class_report
    from headstart.evaluation.metrics import format_report

    targets = torch.arange(len(classes)).repeat(40)
    logits = torch.randn(len(targets), len(classes), generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(targets)), targets] += 1.0  # mostly right, some counts of two digits
    report = class_report(logits, targets, classes)
    assert_matrix_lines_up(format_report(report), classes, report.confusion.tolist())


def test_eval_output_that_cannot_be_written_is_one_line(digits_run, tmp_path, capsys):
    run, rc, _ = digits_run
    assert rc == 0
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "eval"
    assert main(["eval", str(run), "--data", "digits", "--device", "cpu", "--output", str(out)]) == 2
    assert_user_error(2, capsys.readouterr().err, str(out), "give --output a writable folder")


# ---------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def colours_run(tmp_path_factory) -> Path:
    """A model that has learnt red (cat) from blue (fox): five head epochs on the cached random body."""
    out = tmp_path_factory.mktemp("colour-runs")
    data = make_folder(out / "data", ["cat", "fox"])
    rc, _, err = run_captured(train_argv(out, "colours", "--lr", "0.03", "--epochs", "5", "--val-split", "0.25",
                                         "--no-report", "--no-tensorboard", data=data))
    assert rc == 0, err
    return out / "colours"


def test_predict_formats(colours_run, tmp_path, capsys):
    ckpt = str(colours_run / "best.pt")
    # New images of the two colours, never seen in training: the colour is all it takes to be right.
    fresh = make_folder(tmp_path / "fresh", ["cat", "fox"], per_class=3, seed=11)
    assert main(["predict", ckpt, str(fresh), "--format", "json", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 6
    assert [Path(r["file"]).parent.name for r in results] == [r["top"][0]["class"] for r in results]
    assert all(r["top"][0]["probability"] > 0.8 for r in results)
    for got, want in zip(results, python_api_predictions(ckpt, [r["file"] for r in results], k=2), strict=True):
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        assert [t["probability"] for t in got["top"]] == pytest.approx([t["probability"] for t in want["top"]],
                                                                      abs=1e-5)
        assert sum(t["probability"] for t in got["top"]) == pytest.approx(1.0, abs=1e-5)  # two classes, top 2

    assert main(["predict", ckpt, str(fresh / "fox"), str(fresh / "cat" / "cat_0.png"), "--format", "csv",
                 "--top-k", "2", "--device", "cpu"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["file", "rank", "class", "probability"]
    assert [(r[1], r[2]) for r in rows[1::2]] == [("1", "fox")] * 3 + [("1", "cat")]
    assert [(r[1], r[2]) for r in rows[2::2]] == [("2", "cat")] * 3 + [("2", "fox")]
    by_file = {r["file"]: r["top"] for r in results}
    assert all(float(r[3]) == pytest.approx(by_file[r[0]][int(r[1]) - 1]["probability"], abs=1e-6)
               for r in rows[1:])

    assert main(["predict", ckpt, str(fresh / "fox"), "--top-k", "2", "--device", "cpu"]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["file", "top-1", "top-2"]
    assert len(lines) == 3
    for line in lines:
        assert re.fullmatch(r"\S+fox_\d\.png\s+fox \d+\.\d%\s+cat \d+\.\d%", line), line
        assert line[header.index("top-1"):].startswith("fox ")  # each cell under its heading
        assert line[header.index("top-2"):].startswith("cat ")


def python_api_predictions(ckpt: str, files: list[str], k: int) -> list[dict]:
    """What the Python API says about ``files``: the checkpoint's network on its own eval transform."""
    import headstart as hs
    from headstart.data import build_transform, load_image

    net, saved = hs.load_network(ckpt)
    tf = build_transform(net.preprocessing, train=False, augment=False, kind=saved.get("kind", "photo"))
    with torch.no_grad():
        probs = net.eval()(torch.stack([tf(load_image(f)) for f in files])).softmax(1)
    conf, idx = probs.topk(k, dim=1)
    return [{"top": [{"class": saved["classes"][j], "probability": c} for c, j in zip(cs, js)]}
            for cs, js in zip(conf.tolist(), idx.tolist())]


def test_predict_top_k_is_capped_at_the_class_count(pets_run, pets, capsys):
    assert main(["predict", str(pets_run / "best.pt"), str(pets / "cat" / "cat_1.png"), "--format", "json",
                 "--top-k", "10", "--device", "cpu"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert sorted(t["class"] for t in result["top"]) == ["cat", "dog", "fox"]
    assert sum(t["probability"] for t in result["top"]) == pytest.approx(1.0, abs=1e-5)


def _mixed_folder(tmp_path: Path, pets: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((pets / "cat" / "cat_0.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return folder


def test_predict_skips_a_corrupt_image_and_lists_it(pets_run, pets, tmp_path, capsys):
    folder = _mixed_folder(tmp_path, pets)
    assert main(["predict", str(pets_run / "best.pt"), str(folder), "--format", "json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert [Path(r["file"]).name for r in json.loads(captured.out)] == ["good.png"]
    assert "1 unreadable image(s) skipped, 1 predicted" in captured.err and "broken.png" in captured.err


def test_predict_strict_refuses_a_corrupt_image_in_one_line(pets_run, pets, tmp_path, capsys):
    folder = _mixed_folder(tmp_path, pets)
    assert main(["predict", str(pets_run / "best.pt"), str(folder), "--strict", "--device", "cpu"]) == 2
    assert_user_error(2, capsys.readouterr().err, "broken.png")


def test_predict_with_a_garbage_checkpoint_exits_2(tmp_path, capsys):
    rc = main(_garbage_checkpoint(tmp_path))
    assert_user_error(rc, capsys.readouterr().err, "cannot read checkpoint", "model.pt", one_line=False)
