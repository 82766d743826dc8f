"""Run folders are claimed atomically: two runs never share one."""

from __future__ import annotations

import threading

from headstart.config import RunConfig
from headstart.training.runs import RunDir, claim_folder


def test_two_runs_with_the_same_name_get_two_folders(tmp_path):
    cfg = RunConfig()
    cfg.output, cfg.name = str(tmp_path), "r5"
    a = RunDir.new(cfg)
    b = RunDir.new(cfg)  # before a has written anything: its folder is still empty
    assert a.path != b.path
    assert {a.path.name, b.path.name} == {"r5", "r5-2"}


def test_concurrent_claims_never_share_a_folder(tmp_path):
    got: list = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        got.append(claim_folder(tmp_path, "same"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8
    assert all(p.is_dir() for p in got)


def test_a_taken_name_is_reported(tmp_path, caplog):
    claim_folder(tmp_path, "x")
    with caplog.at_level("WARNING"):
        second = claim_folder(tmp_path, "x")
    assert second.name == "x-2"
    assert "taken" in caplog.text
