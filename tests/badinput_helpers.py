"""Helpers for ``test_bad_inputs.py``: run the ``headstart`` CLI as a user would, and make bad input.

The CLI is run as ``python -m headstart ARGS`` with its own environment and working folder, and
only what a user sees is looked at: the exit status, stdout, stderr and the files left behind.
Nothing here imports headstart's modules, so the tests survive the package being reorganised.

Starting Python and importing torch costs about 6 s of CPU on this project's machine, more than
most of the cases themselves. By default each run is therefore a fork of the test process (which
has torch imported already) that resets what pytest changed (warnings filters, standard streams,
exit handlers) and runs ``runpy.run_module("headstart", run_name="__main__")`` -- what
``python -m headstart`` does after start-up. ``HEADSTART_BADINPUT_SPAWN=1`` runs every case as a
real ``[sys.executable, "-m", "headstart", ...]`` subprocess instead, to check that both agree.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SPAWN = os.environ.get("HEADSTART_BADINPUT_SPAWN", "") not in ("", "0") or not hasattr(os, "fork")
TIMEOUT_S = 180.0

if not SPAWN:  # what every forked run would otherwise import again (see the module docstring)
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import headstart  # noqa: F401 - the package only: `import headstart` survives any reorganisation


# ---------------------------------------------------------------------- running the CLI


@dataclass
class Result:
    """What a user sees of one ``headstart`` command."""

    args: list[str]
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def __str__(self) -> str:  # shown when an assertion fails
        return (f"headstart {' '.join(self.args)}\n-> exit {self.rc}\n--- stdout (end)\n{self.out[-3000:]}"
                f"\n--- stderr (end)\n{self.err[-3000:]}")


def _record(r: Result) -> None:
    """With ``HEADSTART_BADINPUT_LOG=FILE``, one JSON line per run: the test, exit code, first stderr line.

    ``HEADSTART_BADINPUT_LOG=/tmp/cases.jsonl pytest tests/test_bad_inputs.py --runxfail`` gives the
    before/after table the issue's closing note asks for.
    """
    log = os.environ.get("HEADSTART_BADINPUT_LOG")
    if not log:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    first = next((line for line in r.err_lines if not line.startswith("WARNING")), r.err_lines[0] if r.err_lines
                 else "")
    with open(log, "a") as f:
        f.write(json.dumps({"test": test, "args": r.args, "rc": r.rc, "stderr_lines": len(r.err_lines),
                            "first_stderr": first[:300]}) + "\n")


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a run: caches inside ``tmp``, one thread, everything else inherited."""
    env = dict(os.environ)
    for key in ("HEADSTART_BADINPUT_SPAWN", "HEADSTART_BADINPUT_LOG", "PYTEST_CURRENT_TEST", "PYTEST_VERSION"):
        env.pop(key, None)
    env.update(HEADSTART_CACHE=str(tmp / "feature-cache"), TORCH_HOME=str(tmp / "torch-home"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Cli:
    """One ``headstart`` command started in the background; :meth:`wait` gives its :class:`Result`."""

    _count = 0

    def __init__(self, args: Sequence[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.args = [str(a) for a in args]
        Cli._count += 1
        logs = cwd / ".cli-logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path = logs / f"{Cli._count}.out"
        self.err_path = logs / f"{Cli._count}.err"
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        if SPAWN:
            with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
                self.proc = subprocess.Popen([sys.executable, "-m", "headstart", *self.args], cwd=cwd, env=env,
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                             start_new_session=True)
            self.pid = self.proc.pid
        else:
            self.pid = _fork_cli(self.args, cwd, env, self.out_path, self.err_path)

    def wait(self, timeout: float = TIMEOUT_S) -> Result:
        deadline = time.monotonic() + timeout
        rc = None
        while rc is None:
            if self.proc is not None:
                rc = self.proc.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                rc = os.waitstatus_to_exitcode(status) if pid else None
            if rc is None:
                if time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"headstart {' '.join(self.args)} ran past {timeout:.0f} s and was killed")
                time.sleep(0.02)
        self._reap_group()
        result = Result(self.args, rc, self.out_path.read_text(errors="replace"),
                        self.err_path.read_text(errors="replace"))
        _record(result)
        return result

    def _reap_group(self) -> None:
        """Kill what the run left in its process group (a loader worker of a run that died)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def kill(self) -> None:
        self._reap_group()
        if self.proc is not None:
            self.proc.wait()
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def run_cli(args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT_S) -> Result:
    """Run ``headstart ARGS`` in ``cwd`` and wait for it."""
    return Cli(args, cwd=cwd, env=env or cli_env(cwd)).wait(timeout)


# Python's own warnings filters at start-up (3.11, no -W options): pytest's "error" must not leak.
_PYTHON_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                           ("ignore", ResourceWarning, "")]


def _stop_daemonic_children() -> None:
    """What interpreter exit does through multiprocessing's exit handler (cleared with pytest's):
    terminate daemonic children such as DataLoader workers of a run that died mid-epoch."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.terminate()
            child.join(1)


def _fork_cli(args: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> int:
    pid = os.fork()
    if pid:
        with contextlib.suppress(OSError):  # also in the parent: no window where the group is pytest's
            os.setpgid(pid, pid)
        return pid
    code = 1  # the child: become a fresh `python -m headstart ARGS` as far as the CLI can tell
    try:
        os.setpgid(0, 0)  # its loader workers are killed with it on a timeout
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start-up
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                      errors="backslashreplace")
        sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
        warnings.resetwarnings()
        for action, category, module in _PYTHON_WARNING_FILTERS:
            warnings.filterwarnings(action, category=category, module=module, append=True)
        atexit._clear()  # pytest's exit handlers are not the CLI's
        sys.argv = ["headstart", *args]
        try:
            runpy.run_module("headstart", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        _stop_daemonic_children()
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------------- what the runs must show


TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s+File \"", re.M)
# torch's advice to load an untrusted file unsafely, in any of its spellings.
UNSAFE_ADVICE = re.compile(r"weights_only\W*(=|set to|to)\W*False", re.I)


def assert_no_traceback(r: Result) -> None:
    assert not TRACEBACK.search(r.text), f"a traceback reached the user:\n{r}"
    assert not UNSAFE_ADVICE.search(r.text), f"torch's weights_only=False advice reached the user:\n{r}"


def assert_user_error(r: Result, *mentions: str) -> None:
    """Exit 2, exactly one line on stderr (``headstart: error: ...``) that names ``mentions``."""
    assert_no_traceback(r)
    assert r.rc == 2, f"expected exit 2:\n{r}"
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("headstart: error: "), \
        f"expected one error line on stderr:\n{r}"
    for m in mentions:
        assert m.lower() in r.err_lines[0].lower(), f"the error should mention {m!r}:\n{r}"


def assert_ran(r: Result) -> None:
    assert_no_traceback(r)
    assert r.rc == 0, f"expected exit 0:\n{r}"


def saved_lines(r: Result) -> list[str]:
    return [line for line in r.out.splitlines() if "saved" in line.lower()]


def run_folders(output: Path) -> list[Path]:
    return sorted(p for p in output.iterdir() if p.is_dir()) if output.exists() else []


def metric_rows(run: Path) -> list[dict[str, str]]:
    import csv

    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def losses(run: Path) -> list[tuple[str, str]]:
    return [(row["train_loss"], row["val_loss"]) for row in metric_rows(run)]


def class_counts(run: Path) -> dict[str, dict[str, int]]:
    return json.loads((run / "summary.json").read_text())["class_counts"]


def checkpoint_tensors_finite(path: Path) -> bool:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values() if t.is_floating_point())


# ---------------------------------------------------------------------- bad input


def make_image(path: Path, size: int = 32, seed: int = 0, fmt: str | None = None, quality: int = 90) -> Path:
    """A noise image (JPEG by the suffix unless ``fmt``); different seeds, different pixels."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path, fmt, quality=quality)
    return path


def make_folder(root: Path, classes: Sequence[str] = ("cat", "dog"), per_class: int = 6, *, suffix: str = ".jpg",
                size: int = 32, seed: int = 0) -> Path:
    """``root/<class>/<i><suffix>``: per_class noise images a class, each with its own pixels."""
    for ci, c in enumerate(classes):
        for i in range(per_class):
            make_image(root / c / f"{i}{suffix}", size, seed=seed * 1000 + ci * 100 + i)
    return root


def corrupt_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG " * 8)
    return path


def zero_byte(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def truncated_jpeg(path: Path, size: int = 64, seed: int = 7) -> Path:
    """A valid JPEG cut in half: ``Image.verify()`` passes it, decoding it fails."""
    make_image(path, size, seed=seed, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:
        im.verify()  # passes: only the decode notices
    with pytest.raises(OSError), Image.open(path) as im:
        im.load()
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (a killed run's temporary files carry such pids)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------- mounts (root only)


def _mount_tmpfs(path: Path, options: str) -> str | None:
    """Mount a tmpfs at ``path``; None when done, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
    except FileNotFoundError:
        return "no mount command"
    return None if done.returncode == 0 else (done.stderr.strip() or "mount failed")


def _unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"1m"``) mounted at ``path`` for the block; skips when mounting is not allowed."""
    why = _mount_tmpfs(path, f"size={size}")
    if why is not None:
        pytest.skip(f"cannot mount a {size} tmpfs here ({why}); this case needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        _unmount(path)


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """An empty folder nothing can be written to. Root ignores file modes, so as root: a read-only
    tmpfs, else ``chattr +i``, else skip; as another user: ``chmod 555``."""
    if os.geteuid() != 0:
        path.mkdir(parents=True)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    why = _mount_tmpfs(path, "size=1m,ro")
    if why is None:
        try:
            yield path
        finally:
            _unmount(path)
        return
    try:
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        immutable = None
    if immutable is None or immutable.returncode != 0:
        pytest.skip(f"cannot make a read-only folder as root here: mount said {why!r}, chattr +i "
                    f"{'is missing' if immutable is None else repr(immutable.stderr.strip())}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
