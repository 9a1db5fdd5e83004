"""Output paths: checked before a run does any work, and published only when complete.

A run that cannot write its results should say so at once, not after hours of training; and a
run that fails halfway must leave nothing that looks finished, so outputs are written under a
temporary name beside their final place and renamed into it at the end.

    out = check_output_dir(args.output, "--output")        # before any work
    with staged_dir(out, last="metrics.json") as tmp:      # after it
        to_json(metrics, tmp / "metrics.json")
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from candle_dist.errors import UserInputError


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` as a folder this process can create or write into; else a UserInputError that
    names `option` (the setting that gave the path)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(
            f"{option} {path} is an existing file, not a folder: choose a folder path (a new one "
            "or an existing folder)"
        )
    _check_writable(path, option)
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a file this process can create or replace; else a UserInputError naming
    `option`."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{option} {path} is a folder: give the path of a file to write")
    _check_writable(path.parent, option, path)
    return path


def _check_writable(folder: Path, option: str, target: Path | None = None) -> None:
    """The nearest existing ancestor of `folder` (itself included) must be a writable folder."""
    target = target or folder
    base = folder.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserInputError(
            f"{option} {target} cannot be created: {base} is a file, not a folder; choose "
            "another path"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserInputError(
            f"{option} {target}: no permission to write in {base}; choose a writable path"
        )


@contextlib.contextmanager
def staged_dir(final: Path, *, replace: bool = False, last: str | None = None) -> Iterator[Path]:
    """A fresh temporary folder, published into `final` when the block completes and removed
    when it fails.

    `replace=True`: `final` belongs to the run and is replaced as a whole (the temporary folder
    beside it is renamed into place, so it either is complete or does not exist). Otherwise an
    existing `final` (it may be a user's folder holding other files) receives the files one by
    one from a temporary folder inside it, the file named `last` after the others, so that its
    presence says the set is complete.
    """
    final = Path(final)
    merge = final.exists() and not replace
    home = final if merge else final.parent
    home.mkdir(parents=True, exist_ok=True)
    staging = home / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if merge:
            for file in sorted(staging.iterdir(), key=lambda p: (p.name == last, p.name)):
                os.replace(file, final / file.name)
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
