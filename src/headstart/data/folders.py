"""Scanning image folders: which files are images, which class each belongs to, which are unreadable.

A folder is walked once per real directory: symbolic links are followed, but a directory already
entered (told apart by device and inode, so a link back up the tree such as ``cat/loop -> .`` is
a cycle) is not entered again, and a file reached under a second name (a hard link, or a link to
a file already found) is counted once, under the first name found. Everything left out this way
is said in one warning line with a count. Every candidate image is decoded once
(:func:`headstart.data.images.image_problem`), so a file cut short is skipped here, as other
unreadable files are, rather than failing later inside a loader worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from headstart.data.datasets import FileDataset
from headstart.data.images import IMAGE_EXTENSIONS, image_problem, is_image_name
from headstart.data.loaders import usable_cpus
from headstart.errors import HeadstartError

log = logging.getLogger("headstart.data")

# How many paths a warning / error message lists before "and N more".
LIST_IN_WARNING = 5
LIST_IN_ERROR = 20
# Decoding is CPU-bound: above this many files, worker processes check them in parallel
# (threads would share one core under the GIL for most of PIL's Python-side work).
PARALLEL_CHECK_FROM = 2000


def listing(items: Sequence[str], limit: int) -> str:
    """``a, b, c and 7 more``."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Scan:
    """One walk over a folder tree, entering each real directory once and counting each file once.

    ``images(folder)`` may be called for several folders (the class folders, then ``val/``
    after ``train/``): a file found by an earlier call is not found again, so the same file never
    lands in two classes or in both splits. ``repeats`` lists what was left out and why.
    """

    def __init__(self, reserved: Iterable[Path] = ()) -> None:
        # Directories entered, or reserved for their own walk (the scanned root and each class
        # folder): a link to one of them from elsewhere is not followed.
        self.dirs: set[tuple[int, int]] = set()
        self.files: dict[tuple[int, int], Path] = {}
        self.repeats: list[tuple[Path, str]] = []
        self.repeated_files = 0  # of ``repeats``, how many are files (the rest are folders)
        for d in reserved:
            self.dirs.add(_key(d.stat()))

    def images(self, folder: Path) -> list[Path]:
        """Image files anywhere under ``folder`` (hidden entries skipped), sorted."""
        found: list[Path] = []
        self._walk(folder, found, top=True)
        return sorted(found)

    def _walk(self, folder: Path, found: list[Path], top: bool = False) -> None:
        try:
            key = _key(folder.stat())
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.repeats.append((folder, f"not readable: {e.strerror or e}"))
            return
        if key in self.dirs and not top:
            self.repeats.append((folder, "a link to a folder scanned already"))
            return
        self.dirs.add(key)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():  # follows symbolic links
                    self._walk(path, found)
                elif is_image_name(path) and entry.is_file():
                    self._add_file(path, _key(entry.stat()), found)
            except OSError as e:  # a dangling link, a file removed while scanning
                self.repeats.append((path, f"not readable: {e.strerror or e}"))

    def _add_file(self, path: Path, key: tuple[int, int], found: list[Path]) -> None:
        first = self.files.get(key)
        if first is not None:
            self.repeats.append((path, f"the same file as {first}"))
            self.repeated_files += 1
            return
        self.files[key] = path
        found.append(path)

    def warn(self, root: Path) -> None:
        """One warning line naming what the walk left out, if anything."""
        if self.repeats:
            log.warning(
                "skipped %d path(s) under %s reached twice or not readable (symbolic link loops, links to "
                "files found already): %s", len(self.repeats), root,
                listing([f"{p} ({why})" for p, why in self.repeats], LIST_IN_WARNING),
            )


def find_images(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, each file once, sorted (a warning says what was left out)."""
    scan = Scan()
    images = scan.images(folder)
    scan.warn(folder)
    return images


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; a single image file gives ``[file]``.

    Raises :class:`HeadstartError` when the path does not exist or holds no images.
    """
    p = Path(os.path.expanduser(str(folder)))
    if not p.exists():
        raise HeadstartError(f"{p} does not exist; give a folder of images or an image file")
    if p.is_file():
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            return [p]
        raise HeadstartError(
            f"{p} is not an image file (known extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    images = find_images(p)
    if not images:
        raise HeadstartError(
            f"no images found under {p} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)"
        )
    return images


def check_images(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """``(path, reason)`` for every file in ``paths`` that does not decode."""
    if not paths:
        return []
    chunks = [list(paths[i : i + 64]) for i in range(0, len(paths), 64)]
    if len(paths) >= PARALLEL_CHECK_FROM and (workers := min(8, usable_cpus())) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            problems = pool.map(_problems, chunks)
    else:
        # Small folders: starting processes costs more than it saves; threads overlap file opens
        # (slow on network drives) and the decoders release the GIL while they run.
        with ThreadPoolExecutor(max_workers=min(8, len(chunks))) as pool:
            problems = pool.map(_problems, chunks)
    return [(p, why) for p, why in zip(paths, (w for chunk in problems for w in chunk)) if why is not None]


def _problems(paths: list[Path]) -> list[str | None]:
    return [image_problem(p) for p in paths]


def handle_unreadable(bad: list[tuple[Path, str]], root: Path, strict: bool) -> list[tuple[Path, str]]:
    """Raise (strict) or log one warning about unreadable images; returns them."""
    if not bad:
        return bad
    if strict:
        lines = [f"{p} ({why})" for p, why in bad]
        raise HeadstartError(
            f"{len(bad)} unreadable image(s) under {root}: {listing(lines, LIST_IN_ERROR)}. "
            f"Remove or re-export them, or set data.strict=false to skip them."
        )
    log.warning(
        "skipped %d unreadable image(s) under %s: %s (data.strict=true makes this an error)",
        len(bad), root, listing([str(p) for p, _ in bad], LIST_IN_WARNING),
    )
    return bad


def class_folders(folder: Path) -> list[Path]:
    """The class subfolders of ``folder`` (hidden ones skipped), sorted by name."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_classes(folder: Path, scan: Scan) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Readable ``(path, class)`` pairs in ``folder/<class>/...`` and ``(path, reason)`` failures."""
    candidates = [(p, d.name) for d in class_folders(folder) for p in scan.images(d)]
    bad = check_images([p for p, _ in candidates])
    bad_paths = {p for p, _ in bad}
    good = [(p, c) for p, c in candidates if p not in bad_paths]
    return good, bad


def new_scan(root: Path, *folders: Path) -> Scan:
    """A :class:`Scan` with ``root``, ``folders`` and their class folders reserved."""
    return Scan([root, *folders, *(d for f in folders for d in class_folders(f))])


def classes_of(items: list[tuple[Path, str]], folder: Path) -> list[str]:
    """Sorted class names with at least one readable image; errors for fewer than two."""
    classes = sorted({c for _, c in items})
    loose = [p for p in folder.iterdir() if is_image_name(p) and p.is_file()]
    if not classes:
        found = f"found {len(loose)} image(s) directly in {folder} but " if loose else ""
        raise HeadstartError(
            f"{found}no images in class subfolders of {folder}; put each class's images in its own "
            f"subfolder: {folder}/<class>/<image> (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if loose:
        log.warning(
            "ignoring %d image(s) directly in %s (e.g. %s): images must sit in a subfolder named "
            "after their class", len(loose), folder, loose[0].name,
        )
    empty = sorted(d.name for d in class_folders(folder) if d.name not in classes)
    if empty:
        log.warning("ignoring subfolder(s) of %s with no readable images: %s", folder, ", ".join(empty))
    if len(classes) < 2:
        raise HeadstartError(
            f"{folder} has only one class ({classes[0]}); a classifier needs at least two class "
            f"subfolders with images"
        )
    return classes


def file_dataset(items: list[tuple[Path, str]], classes: list[str]) -> FileDataset:
    """A :class:`FileDataset` of ``(path, class name)`` pairs, targets indexing ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    return FileDataset([p for p, _ in items], [index[c] for _, c in items], classes)


def folder_dataset(folder: str | Path, *, strict: bool = False) -> FileDataset:
    """Every readable image of a class-subfolder tree as one dataset (for evaluating a test set)."""
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        raise HeadstartError(f"data folder {root} does not exist")
    scan = new_scan(root, root)
    items, bad = scan_classes(root, scan)
    scan.warn(root)
    handle_unreadable(bad, root, strict)
    classes = sorted({c for _, c in items})
    if not classes:
        raise HeadstartError(f"no images in class subfolders of {root}: put them in {root}/<class>/<image>")
    return file_dataset(items, classes)
