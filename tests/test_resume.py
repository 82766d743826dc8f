"""A run killed in the middle of its second stage resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from headstart.cli import main

ARGS = [
    "--model", "resnet18", "--weights", "none", "--input-size", "32", "--data", "digits",
    "--limit-train", "96", "--limit-val", "32", "--batch-size", "16", "--epochs", "1",
    "--finetune-epochs", "3", "--finetune-bn", "frozen", "--no-progress", "--seed", "3",
]


def _rows(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_kill_in_second_stage_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    assert main(["train", *ARGS, "--output", str(tmp_path), "--name", "whole"]) == 0

    # The same run in a child process, killed (SIGKILL: no clean-up at all) once the first
    # fine-tuning epoch has been checkpointed, i.e. in the middle of stage 2.
    env = os.environ | {"HEADSTART_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "headstart", "train", *ARGS, "--output", str(tmp_path), "--name", "killed"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while _rows(run) < 2 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(rows) < 4, "the kill must land inside the fine-tuning stage"
    assert rows[-1]["stage"] == "finetune"
    # SIGKILL may leave a temporary file behind, but the checkpoint itself is never torn.
    torch.load(run / "last.pt", weights_only=True)

    assert main(["train", "--resume", str(run)]) == 0
    whole, resumed = _state(tmp_path / "whole" / "last.pt"), _state(run / "last.pt")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_epoch"] for r in history] == [1, 2, 3, 4]


def test_resume_of_finished_run_trains_nothing_more(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    args = [a if a != "3" else "1" for a in ARGS]  # one fine-tuning epoch
    assert main(["train", *args, "--output", str(tmp_path), "--name", "done"]) == 0
    before = _state(tmp_path / "done" / "last.pt")
    assert main(["train", "--resume", str(tmp_path / "done")]) == 0
    after = _state(tmp_path / "done" / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "epoch 1/1" not in capsys.readouterr().out.split("resuming")[-1]
