"""The jobs behind the CLI: what they say and what they leave behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import headstart as hs
from headstart.cli import main
from headstart.errors import HeadstartError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "flat-layout-squeezenet.pt"
TINY = ["--model", "squeezenet1_1", "--weights", "none", "--input-size", "32", "--no-report",
        "--set", "data.limit_train=40", "--set", "data.limit_val=20", "--set", "tensorboard=false",
        "--set", "train.progress=false"]


def _images(folder: Path, good: int, bad: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(good):
        p = folder / f"good{i}.png"
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(p)
        out.append(p)
    for i in range(bad):
        p = folder / f"bad{i}.jpg"
        p.write_bytes(b"\xff\xd8 not really a jpeg" if i % 2 else b"")
        out.append(p)
    return out


def test_predict_keeps_going_past_unreadable_images(tmp_path):
    _images(tmp_path / "imgs", good=3, bad=3)
    results = hs.predict(FIXTURE, [tmp_path / "imgs"], top_k=2, device="cpu")
    assert sorted(Path(r["file"]).name for r in results) == ["good0.png", "good1.png", "good2.png"]
    assert sorted(Path(f).name for f, _ in results.unreadable) == ["bad0.jpg", "bad1.jpg", "bad2.jpg"]
    assert all("cannot read image" in why or "does not exist" in why for _, why in results.unreadable)


def test_predict_strict_or_nothing_readable_is_an_error(tmp_path):
    _images(tmp_path / "mixed", good=2, bad=2)
    with pytest.raises(HeadstartError, match="2 of 4 images are unreadable"):
        hs.predict(FIXTURE, [tmp_path / "mixed"], device="cpu", strict=True)
    _images(tmp_path / "bad", good=0, bad=2)
    with pytest.raises(HeadstartError, match="no image could be read"):
        hs.predict(FIXTURE, [tmp_path / "bad"], device="cpu")


def test_train_narrates_the_seeds_steps_with_the_model_as_loaded(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--output", str(tmp_path), "--name", "n"]) == 0
    out = capsys.readouterr().out
    for step in ("== 1. load", "== 2. understand", "== 3. freeze", "== 4. new classifier"):
        assert step in out
    as_loaded = hs.count_params(hs.build_network("squeezenet1_1", "none", input_size=32))[0]
    assert f"{as_loaded:,} parameters as loaded" in out
    assert "1000 outputs" in out  # step 2 shows the pretrained classifier, not the new one
    assert out.index("1000 outputs") < out.index("== 4. new classifier")


def test_a_run_that_trains_nothing_says_so_and_claims_no_model(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "0", "--output", str(tmp_path), "--name", "zero"]) == 0
    out = capsys.readouterr().out
    assert "nothing was trained" in out
    assert "model saved" not in out
    assert not (tmp_path / "zero" / "best.pt").exists()


def test_resuming_a_finished_run_trains_and_rewrites_nothing(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--output", str(tmp_path), "--name", "done"]) == 0
    metrics = (tmp_path / "done" / "metrics.csv").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "done")]) == 0
    out = capsys.readouterr().out
    assert "nothing left to train" in out
    assert "== 1. load" not in out and "epoch 1/1" not in out
    assert (tmp_path / "done" / "metrics.csv").read_text() == metrics


def test_eval_and_interpret_use_the_same_images(tmp_path):
    # One rule (evaluation/evalset.py): the run's own data gives the images it validated on, in
    # `headstart eval` as in the report's interpretation.
    assert main(["train", *TINY, "--epochs", "1", "--output", str(tmp_path), "--name", "same"]) == 0
    run = tmp_path / "same"
    report = hs.evaluate_checkpoint(run / "best.pt", "digits", device="cpu")
    interp = hs.interpret(run, data_source="digits", device="cpu")
    assert len(interp.targets) == 360  # named data: its whole validation split, not the run's limit
    assert len(hs.interpret(run, device="cpu").targets) == 20  # the run's own: the images it validated on
    assert report.top1 == interp.report.top1
    assert report.confusion.tolist() == interp.report.confusion.tolist()
