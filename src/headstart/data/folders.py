"""Scanning image folders: which files are images, which class each belongs to, which are unreadable."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from headstart.data.datasets import FileDataset
from headstart.data.images import IMAGE_EXTENSIONS, image_problem, is_image_name
from headstart.errors import HeadstartError

log = logging.getLogger("headstart.data")

# How many paths a warning / error message lists before "and N more".
LIST_IN_WARNING = 5
LIST_IN_ERROR = 20


def listing(items: Sequence[str], limit: int) -> str:
    """``a, b, c and 7 more``."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def find_images(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (hidden folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(p for p in (Path(dirpath) / f for f in filenames) if is_image_name(p) and p.is_file())
    return sorted(found)


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
    """``(path, reason)`` for every unreadable file in ``paths``."""
    if not paths:
        return []
    # File opens are I/O-bound (and slow on network drives): threads overlap them.
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        problems = list(pool.map(image_problem, paths))
    return [(p, why) for p, why in zip(paths, problems) if why is not None]


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


def scan_classes(folder: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Readable ``(path, class)`` pairs in ``folder/<class>/...`` and ``(path, reason)`` failures."""
    candidates = [(p, d.name) for d in class_folders(folder) for p in find_images(d)]
    bad = check_images([p for p, _ in candidates])
    bad_paths = {p for p, _ in bad}
    good = [(p, c) for p, c in candidates if p not in bad_paths]
    return good, bad


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
    items, bad = scan_classes(root)
    handle_unreadable(bad, root, strict)
    classes = sorted({c for _, c in items})
    if not classes:
        raise HeadstartError(f"no images in class subfolders of {root}: put them in {root}/<class>/<image>")
    return file_dataset(items, classes)
