"""Issue 10, "Nothing lost, nothing silent": the bad-input list run end to end through the CLI.

Each case makes its own bad input in ``tmp_path`` (corrupt, empty and truncated JPEGs, a symlink
loop, duplicated files, read-only and full folders, concurrent runs, bad values, malformed
checkpoints and weights files, damaged cache entries), runs ``headstart`` as a user would (see
``badinput_helpers``) and checks what the issue promises: exit 2 with exactly one line on stderr
and no traceback for a mistake, exit 0 where the run should go on, and nothing lost or silently
wrong. Cases that fail today carry ``xfail(strict=True)`` naming the issue's item: whoever fixes
one removes its marker (a strict xfail fails as soon as the bug is gone).

Read-only and full folders need a tmpfs mounted for the test (root with CAP_SYS_ADMIN); without
that those cases skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from badinput_helpers import (
    Cli,
    Result,
    assert_no_traceback,
    assert_ran,
    assert_user_error,
    checkpoint_tensors_finite,
    class_counts,
    cli_env,
    corrupt_jpeg,
    dead_pid,
    losses,
    make_folder,
    make_image,
    metric_rows,
    read_only_folder,
    run_cli,
    run_folders,
    saved_lines,
    tmpfs,
    truncated_jpeg,
    zero_byte,
)


def xfail(item: str):
    return pytest.mark.xfail(strict=True, reason=f"issue 10: {item}")


def train_args(data: Path, output: Path, name: str = "r", *extra: str, epochs: int | None = 1) -> list[str]:
    """A tiny run: random-weight ResNet-18 at 32 px, no workers, reports or event files (``extra`` wins)."""
    args = ["train", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--data", str(data),
            "--workers", "0", "--no-progress", "--no-report", "--no-tensorboard", "--output", str(output),
            "--name", name]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    return args + list(extra)


def train(tmp: Path, data: Path, *extra: str, name: str = "r", epochs: int | None = 1,
          env: dict[str, str] | None = None) -> Result:
    return run_cli(train_args(data, tmp / "runs", name, *extra, epochs=epochs), cwd=tmp, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run on 2 classes x 6 JPEGs: its folder, best.pt, data and feature cache."""
    tmp = tmp_path_factory.mktemp("trained")
    data = make_folder(tmp / "data")
    r = train(tmp, data)
    assert_ran(r)
    run = tmp / "runs" / "r"
    return {"tmp": tmp, "data": data, "run": run, "ckpt": run / "best.pt", "cache": tmp / "feature-cache"}


def cache_entry(cache: Path) -> Path:
    """The feature-cache entry folder (``<root>/<key>/``) holding the first view0.npy under ``cache``."""
    return sorted(cache.rglob("view0.npy"))[0].parent


# ====================================================================== silent results and lost data


def test_symlink_loop_counts_each_image_once_and_says_what_was_skipped(tmp_path):
    data = make_folder(tmp_path / "data")
    os.symlink(".", data / "cat" / "loop")
    r = train(tmp_path, data)
    assert_ran(r)
    counts = class_counts(tmp_path / "runs" / "r")
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 12, counts
    assert "cat/loop" in r.text, f"the skipped loop should be named:\n{r}"


def test_the_same_file_is_never_in_both_train_and_val(tmp_path):
    data = make_folder(tmp_path / "data", ("cat",))
    dog = make_image(tmp_path / "data" / "dog" / "a.jpg", seed=99)
    os.link(dog, dog.with_name("b.jpg"))
    os.symlink("a.jpg", dog.with_name("c.jpg"))
    r = train(tmp_path, data)
    if r.rc == 2:  # refusing the data is fine too, in one line
        return assert_user_error(r)
    assert_ran(r)
    counts = class_counts(tmp_path / "runs" / "r")
    # dog/ holds one file under three names: wherever it goes, it must not be in both splits.
    assert not (counts["train"]["dog"] and counts["val"]["dog"]), counts


def test_two_runs_started_together_with_one_name_get_their_own_folders(tmp_path):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "D"
    env = cli_env(tmp_path)
    # TensorBoard stays on: importing it is the window in which both runs find the folder free.
    args = [a for a in train_args(data, out, "r5") if a != "--no-tensorboard"]
    runs = [Cli([*args, "--seed", str(seed)], cwd=tmp_path, env=env) for seed in (1, 2)]
    results = [c.wait() for c in runs]
    for r in results:
        assert_no_traceback(r)
        assert r.rc == 0 or (r.rc == 2 and len(r.err_lines) == 1), f"refusing is fine, in one line:\n{r}"
    finished = [r for r in results if r.rc == 0]
    assert finished, "at least one of the two runs must finish"
    folders = {re.search(r"model saved to (.+)/best\.pt", r.out).group(1) for r in finished}
    assert len(folders) == len(finished), f"two runs, one folder: {folders}"
    for folder in folders:
        rows = metric_rows(Path(folder))
        assert len(rows) == 1, f"{folder}/metrics.csv mixes runs: {rows}"


def test_non_finite_loss_stops_the_run_and_saves_no_nan_weights(tmp_path):
    data = make_folder(tmp_path / "data")
    r = train(tmp_path, data, "--lr", "1e6", "--batch-size", "2", epochs=3)
    assert_user_error(r, "lr")
    assert not saved_lines(r), f"no 'saved' line after a diverged run:\n{r}"
    for pt in (tmp_path / "runs" / "r").glob("*.pt"):
        assert checkpoint_tensors_finite(pt), f"{pt.name} holds non-finite weights"


def test_a_run_that_trained_nothing_says_so(tmp_path):
    data = make_folder(tmp_path / "data")
    r = train(tmp_path, data, epochs=0)
    assert_no_traceback(r)
    assert re.search(r"nothing (was |has been )?trained", r.text, re.I), f"should say nothing was trained:\n{r}"
    assert not saved_lines(r), f"no 'saved' line when nothing was trained:\n{r}"


def test_a_negative_epoch_count_is_refused_before_anything_is_written(tmp_path):
    data = make_folder(tmp_path / "data")
    r = train(tmp_path, data, epochs=-1)
    assert_user_error(r, "epochs")
    assert run_folders(tmp_path / "runs") == []


# ---------------------------------------------------------------------- unreadable images


def folder_with(tmp: Path, *bad: str) -> Path:
    """2 classes x 6 good JPEGs, plus under cat/ the bad files named (``truncated``, ``corrupt``, ``empty``)."""
    data = make_folder(tmp / "data")
    for kind in bad:
        path = data / "cat" / f"{kind}.jpg"
        {"truncated": truncated_jpeg, "corrupt": corrupt_jpeg, "empty": zero_byte}[kind](path)
    return data


def test_corrupt_and_empty_images_are_skipped_with_a_warning(tmp_path):
    r = train(tmp_path, folder_with(tmp_path, "corrupt", "empty"))
    assert_ran(r)
    assert "skipped 2 unreadable" in r.err and "corrupt.jpg" in r.err and "empty.jpg" in r.err, str(r)
    counts = class_counts(tmp_path / "runs" / "r")
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 12


def test_corrupt_and_empty_images_under_strict_are_one_line(tmp_path):
    r = train(tmp_path, folder_with(tmp_path, "corrupt", "empty"), "--strict")
    assert_user_error(r, "2 unreadable", "corrupt.jpg", "empty.jpg")
    assert run_folders(tmp_path / "runs") == []


@pytest.mark.parametrize("loading", ["--workers 2", "--workers 0", "--workers 2 --in-memory no"])
def test_a_truncated_jpeg_is_skipped_in_train(tmp_path, loading):
    r = train(tmp_path, folder_with(tmp_path, "truncated"), *loading.split())
    assert_ran(r)
    assert "truncated.jpg" in r.err, f"the skipped file should be named:\n{r}"
    counts = class_counts(tmp_path / "runs" / "r")
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 12


def test_a_truncated_jpeg_under_strict_is_one_line(tmp_path):
    r = train(tmp_path, folder_with(tmp_path, "truncated"), "--strict", "--workers", "2")
    assert_user_error(r, "truncated.jpg")
    assert run_folders(tmp_path / "runs") == []


def test_a_truncated_jpeg_is_skipped_in_eval(tmp_path, trained):
    data = folder_with(tmp_path, "truncated")
    r = run_cli(["eval", trained["ckpt"], "--data", data, "--output", tmp_path / "eval", "--device", "cpu"],
                cwd=tmp_path)
    assert_ran(r)
    assert "truncated.jpg" in r.err, f"the skipped file should be named:\n{r}"
    assert (tmp_path / "eval" / "eval.json").exists()


# ---------------------------------------------------------------------- predict over many files


def predict_folder(tmp: Path, trained: dict, good: int, *bad: str) -> Path:
    """``good`` readable photos (copies of training images) and the bad files named."""
    folder = tmp / "photos"
    folder.mkdir()
    for i in range(good):
        shutil.copy(trained["data"] / "dog" / f"{i}.jpg", folder / f"good{i}.jpg")
    for kind in bad:
        {"truncated": truncated_jpeg, "corrupt": corrupt_jpeg, "empty": zero_byte}[kind](folder / f"{kind}.jpg")
    return folder


def test_predict_classifies_the_readable_files_and_lists_the_others(tmp_path, trained):
    import json

    folder = predict_folder(tmp_path, trained, 3, "corrupt", "empty", "truncated")
    r = run_cli(["predict", trained["ckpt"], folder, "--format", "json", "--device", "cpu"], cwd=tmp_path)
    assert_ran(r)
    assert sorted(Path(p["file"]).name for p in json.loads(r.out)) == ["good0.jpg", "good1.jpg", "good2.jpg"]
    for name in ("corrupt.jpg", "empty.jpg", "truncated.jpg"):
        assert name in r.err, f"{name} should be listed as unreadable:\n{r}"
    assert "3" in r.err, f"the count of unreadable files should be given:\n{r}"


def test_predict_strict_refuses_unreadable_files_in_one_line(tmp_path, trained):
    folder = predict_folder(tmp_path, trained, 3, "corrupt", "empty", "truncated")
    r = run_cli(["predict", trained["ckpt"], folder, "--strict", "--device", "cpu"], cwd=tmp_path)
    assert_user_error(r, "corrupt.jpg")


def test_predict_with_nothing_readable_exits_2_in_one_line(tmp_path, trained):
    folder = predict_folder(tmp_path, trained, 0, "corrupt", "empty")
    r = run_cli(["predict", trained["ckpt"], folder, "--device", "cpu"], cwd=tmp_path)
    assert_user_error(r, "corrupt.jpg")


# ---------------------------------------------------------------------- the feature cache


def test_changed_pixels_with_the_same_size_and_mtime_are_not_served_from_the_cache(tmp_path):
    data = make_folder(tmp_path / "data", suffix=".bmp")  # BMP: new pixels, same file size
    first = train(tmp_path, data, name="before")
    assert_ran(first)
    for i, path in enumerate(sorted(data.rglob("*.bmp"))):
        st = path.stat()
        make_image(path, seed=500 + i)
        assert path.stat().st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = train(tmp_path, data, name="after")  # the same cache as the first run
    fresh = train(tmp_path, data, name="fresh", env=cli_env(tmp_path, HEADSTART_CACHE=str(tmp_path / "empty-cache")))
    assert_ran(again)
    assert_ran(fresh)
    runs = tmp_path / "runs"
    assert losses(runs / "fresh") != losses(runs / "before"), "the new pixels should change the losses"
    assert losses(runs / "after") == losses(runs / "fresh"), "features of the old pixels were served"


def test_an_orphaned_temporary_file_is_not_counted_as_cache(tmp_path):
    cache = tmp_path / "cache"
    orphan = cache / ("0" * 24) / f".view0.npy.{dead_pid()}.tmp"  # what a killed extraction leaves
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"\0" * (4 << 20))
    r = run_cli(["cache", "info", "--dir", cache], cwd=tmp_path)
    assert_ran(r)
    total = re.search(r"([\d.]+) MiB\s*$", r.out.strip())
    assert total and float(total.group(1)) < 1.0, f"4 MiB of an orphaned temporary file counted:\n{r}"


def test_a_partial_view_json_does_not_crash_cache_info(tmp_path, trained):
    cache = tmp_path / "cache"
    shutil.copytree(trained["cache"], cache)
    meta = cache_entry(cache) / "view0.json"
    meta.write_text(meta.read_text()[:10])
    r = run_cli(["cache", "info", "--dir", cache], cwd=tmp_path)
    assert_ran(r)


def test_a_truncated_npy_in_the_cache_is_rebuilt_and_said(tmp_path, trained):
    cache = tmp_path / "cache"
    shutil.copytree(trained["cache"], cache)
    entry = cache_entry(cache)
    npy = entry / "view0.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])
    r = train(tmp_path, trained["data"], env=cli_env(tmp_path, HEADSTART_CACHE=str(cache)))
    assert_ran(r)
    assert entry.name in r.text, f"the damaged entry should be named:\n{r}"
    assert losses(tmp_path / "runs" / "r") == losses(trained["run"]), "rebuilt features differ"


# ====================================================================== errors that are tracebacks today


def test_a_full_disk_is_one_line_and_earlier_checkpoints_stay_intact(tmp_path, trained):
    size = trained["ckpt"].stat().st_size  # room for epoch 1's best.pt and last.pt, not for epoch 2's
    with tmpfs(tmp_path / "small", f"{int(size * 2.5) // 1024}k") as out:
        r = run_cli(train_args(trained["data"], out, "r", epochs=2), cwd=tmp_path)
        run = out / "r"
        kept = {p.name: checkpoint_tensors_finite(p) for p in run.glob("*.pt")}
        leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        epochs = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["metrics"]["epoch"]
    assert kept == {"best.pt": True, "last.pt": True} and epochs == 1 and not leftovers, (kept, epochs, leftovers)
    assert_user_error(r, ".pt")
    assert re.search(r"\d\s*([KMG]i?B|bytes)", r.err_lines[0]), f"say how much space was needed:\n{r}"


@pytest.fixture
def read_only(tmp_path):
    with read_only_folder(tmp_path / "read-only") as path:
        yield path


@pytest.mark.parametrize("where", [
    "train --output",
    "train --cache-dir",
    "eval --output",
])
def test_a_read_only_folder_is_one_line(tmp_path, trained, read_only, where):
    if where == "eval --output":
        args = ["eval", trained["ckpt"], "--data", trained["data"], "--output", read_only, "--device", "cpu"]
    elif where == "train --output":
        args = train_args(trained["data"], read_only, "r")
    else:
        args = train_args(trained["data"], tmp_path / "runs", "r", "--cache-dir", str(read_only))
    r = run_cli(args, cwd=tmp_path)
    assert_user_error(r, str(read_only))


def yaml_config(tmp: Path, text: str) -> str:
    path = tmp / "run.yaml"
    path.write_text(text)
    return str(path)


BAD_VALUES = {
    "--lr -1": (["--lr", "-1"], "lr"),
    "--lr nan": (["--lr", "nan"], "lr"),
    "--input-size 0": (["--input-size", "0"], "input_size"),
    "--workers -1": (["--workers", "-1"], "workers"),
}


@pytest.mark.parametrize("case", [*BAD_VALUES, "epochs: true"])
def test_a_bad_config_value_is_refused_before_anything_is_written(tmp_path, case):
    data = make_folder(tmp_path / "data")
    if case == "epochs: true":
        r = train(tmp_path, data, "--config", yaml_config(tmp_path, "train:\n  epochs: true\n"), epochs=None)
        key = "epochs"
    else:
        extra, key = BAD_VALUES[case]
        r = train(tmp_path, data, *extra)
    assert_user_error(r, key)
    assert run_folders(tmp_path / "runs") == [], "a run folder was left behind"


@pytest.mark.parametrize("kind", ["binary file", "directory"])
def test_a_config_that_is_not_a_yaml_file_is_one_line(tmp_path, kind):
    config = tmp_path / "run.yaml"
    if kind == "directory":
        config.mkdir()
    else:
        config.write_bytes(bytes(range(256)) * 4)
    r = train(tmp_path, make_folder(tmp_path / "data"), "--config", str(config))
    assert_user_error(r, "run.yaml")


# ---------------------------------------------------------------------- checkpoints and weights files


def malformed(ckpt: dict, case: str) -> dict:
    if case.startswith("no "):
        del ckpt[case[3:]]
    elif case == "swapped architecture":
        ckpt["arch"] = "resnet34"
    elif case == "fewer class names than outputs":
        # Two outputs, one name, and the second output always wins: the missing name is needed.
        ckpt["classes"] = ckpt["classes"][:1]
        weight, bias = sorted(k for k in ckpt["state_dict"] if k.startswith("head."))[-2:][::-1]
        assert ckpt["state_dict"][bias].shape == (2,), "the head's final layer: two outputs"
        ckpt["state_dict"][weight] = torch.zeros_like(ckpt["state_dict"][weight])
        ckpt["state_dict"][bias] = torch.tensor([-100.0, 100.0])
    return ckpt


@pytest.mark.parametrize("case", ["no state_dict", "no classes", "swapped architecture",
                                  "fewer class names than outputs"])
def test_a_malformed_checkpoint_is_one_line(tmp_path, trained, case):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["format"].startswith("headstart-checkpoint"), "the case needs the format tag"
    bad = tmp_path / "model.pt"
    torch.save(malformed(ckpt, case), bad)
    r = run_cli(["predict", bad, trained["data"] / "cat" / "0.jpg", "--device", "cpu"], cwd=tmp_path)
    assert_user_error(r, "model.pt")


def state_dict_file(tmp: Path, model: torch.nn.Module) -> str:
    path = tmp / f"{type(model).__name__.lower()}.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_a_mnasnet_state_dict_file_loads_as_weights(tmp_path):
    from torchvision.models import mnasnet0_5

    weights = state_dict_file(tmp_path, mnasnet0_5())
    r = train(tmp_path, make_folder(tmp_path / "data"), "--model", "mnasnet0_5", "--weights", weights)
    assert_ran(r)


@pytest.mark.parametrize("name", ["googlenet", pytest.param("inception_v3", marks=pytest.mark.slow)])
def test_a_state_dict_without_aux_heads_loads_as_weights(tmp_path, name):
    from torchvision import models

    weights = state_dict_file(tmp_path, getattr(models, name)(aux_logits=False, init_weights=False))
    size = "80" if name == "inception_v3" else "32"
    r = train(tmp_path, make_folder(tmp_path / "data"), "--model", name, "--weights", weights, "--input-size", size)
    assert_ran(r)


class RunsCode:
    """Unpickling this runs a shell command: headstart must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("path", ["--weights", "predict CHECKPOINT"])
def test_a_file_with_code_in_its_pickle_is_refused_in_one_line(tmp_path, trained, path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    state = {k: v for k, v in torch.load(trained["ckpt"], weights_only=True)["state_dict"].items()}
    torch.save(state | {"payload": RunsCode(marker)}, evil)
    if path == "--weights":
        r = train(tmp_path, trained["data"], "--weights", str(evil))
    else:
        r = run_cli(["predict", evil, trained["data"] / "cat" / "0.jpg", "--device", "cpu"], cwd=tmp_path)
    assert not marker.exists(), "the pickle's code ran"
    assert_user_error(r, "evil.pth")
