"""WebDataset tar shards: URL lists, rank/worker splits, atomic writes and a fault-tolerant reader.

Shards are plain WebDataset tars (`train-000000.tar` holding `KEY.jpg`, `KEY.cls`, `KEY.json`).
Writing goes through `webdataset.TarWriter` into a temporary name that is renamed when the shard
is complete, so a killed writer never leaves a half shard under a final name. Reading opens any
URL `webdataset.gopen` opens (local paths, `pipe:` commands, http) and turns damage into data:
a truncated tar yields the samples before the damage and one `ReadProblem` naming the key.

`classnames.txt` (one name per line, class id = line index) and `counts.tsv` (training
counts and the base/new split) sit beside the shards; both are read and written here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds

from candle_dist.errors import UserInputError

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
COUNTS_HEADER = ("class_id", "name", "count", "split")
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace-expand a shard spec (`dir/train-{000000..000123}.tar`, `a.tar::b.tar`, or a list)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls = [
        url
        for part in parts
        for piece in part.split("::")
        for url in braceexpand.braceexpand(piece)
    ]
    if not urls:
        raise UserInputError(
            f"shard spec {spec!r} expands to no URL: give e.g. 'dir/train-{{000000..000009}}.tar'"
        )
    return urls


def take_share(items: Sequence, index: int, count: int) -> list:
    """The share of taker `index` of `count` (ranks, loader workers): every count-th item.

    Shares are disjoint and together hold every item, whatever `count` is.
    """
    return list(items[index::count])


def shard_stem(url: str) -> str:
    """The shard's file name without `.tar` (or `.tar.gz`, `.tgz`): names its output files."""
    name = url.split()[-1].rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_local(url: str) -> bool:
    """True for plain file paths (no `scheme:` prefix), which can be checked before a run."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) is None or url.startswith("file:")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block completes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """`np.save` through a temporary file and a rename (the result can be memory-mapped)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))


def write_shard(path: str | Path, samples: Sequence[dict]) -> None:
    """Write WebDataset samples (`__key__` plus byte/str fields) into one tar, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_output(path) as tmp,
        open(tmp, "wb") as stream,
        wds.TarWriter(stream, mtime=0) as writer,
    ):
        for sample in samples:
            writer.write(sample)


@dataclass
class TarSample:
    """One sample of a shard: its key and its raw fields (`{"jpg": b"...", "cls": b"3"}`)."""

    key: str
    fields: dict[str, bytes]


@dataclass
class ReadProblem:
    """Damage met while reading a shard: the key it cost (None if no key was read) and why."""

    key: str | None
    reason: str


class _HashingReader(io.RawIOBase):
    """A read-through stream that hashes and counts the bytes the tar reader consumes."""

    def __init__(self, stream):
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Notes whether the archive ended with its end-of-archive block or just stopped (truncated)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.ended_without_marker = True
            raise


@dataclass
class TarReader:
    """Iterate the samples of one shard URL, tolerating damage; hash the bytes on the way.

    Yields `TarSample` for each key group (consecutive members sharing a key, as WebDataset
    groups them) and `ReadProblem` for a truncated or unreadable tar. After iteration,
    `sha256` and `num_bytes` describe the bytes read.
    """

    url: str
    sha256: str = ""
    num_bytes: int = 0

    def __iter__(self) -> Iterator[TarSample | ReadProblem]:
        stream = wds.gopen(self.url, "rb")
        hashing = _HashingReader(stream)
        try:
            yield from self._samples(hashing)
        finally:
            with contextlib.suppress(Exception):
                stream.close()
            self.sha256 = hashing.sha256.hexdigest()
            self.num_bytes = hashing.num_bytes

    def _samples(self, stream) -> Iterator[TarSample | ReadProblem]:
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo) as tar:
                tar.ended_without_marker = False
                yield from self._groups(tar)
        except tarfile.TarError as err:
            yield ReadProblem(None, f"unreadable tar ({err})")

    @staticmethod
    def _groups(tar: tarfile.TarFile) -> Iterator[TarSample | ReadProblem]:
        current: TarSample | None = None
        try:
            for member in tar:
                match = _KEY_AND_FIELD.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                key, name = match.group(1), match.group(2).lower()
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key, {})
                handle = tar.extractfile(member)
                current.fields[name] = handle.read() if handle is not None else b""
        except (tarfile.TarError, EOFError, OSError) as err:
            yield ReadProblem(current.key if current else None, f"truncated tar ({err})")
            return
        if tar.ended_without_marker:
            lost = current.key if current else None
            yield ReadProblem(lost, "truncated tar (no end-of-archive block)")
        elif current is not None:
            yield current


def read_classnames(path: str | Path) -> list[str]:
    """Class names from a file of one name per line (class id = line index)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(
            f"{path}: class-name file not found; `candle-dist make-shards` writes classnames.txt "
            "beside the shards, or pass --classnames FILE (one name per line)"
        )
    names = path.read_text(encoding="utf-8").splitlines()
    while names and not names[-1].strip():
        names.pop()
    for line_no, name in enumerate(names, 1):
        if not name.strip():
            raise UserInputError(f"{path}:{line_no}: empty class name; one name per line")
    if not names:
        raise UserInputError(f"{path}: no class names; one name per line")
    return names


def write_classnames(path: str | Path, names: Sequence[str]) -> None:
    for name in names:
        if "\n" in name or not name.strip():
            raise UserInputError(f"class name {name!r} is empty or holds a newline: fix the names")
    atomic_write_text(path, "".join(f"{name}\n" for name in names))


def write_counts_tsv(
    path: str | Path, names: Sequence[str], counts: Sequence[int], num_base: int
) -> None:
    """`class_id  name  count  split` rows; classes below `num_base` are base, the rest new."""
    rows = ["\t".join(COUNTS_HEADER)]
    for class_id, (name, count) in enumerate(zip(names, counts, strict=True)):
        rows.append(f"{class_id}\t{name}\t{int(count)}\t{'base' if class_id < num_base else 'new'}")
    atomic_write_text(path, "\n".join(rows) + "\n")


def read_counts_tsv(path: str | Path, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """(training counts [C] int64, number of base classes) from a `counts.tsv`.

    Base classes must be ids 0..C_base-1 and new classes come after, as make-shards writes them.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(
            f"{path}: counts file not found; `candle-dist make-shards` writes counts.tsv beside "
            "the shards, or pass --counts FILE"
        )
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or tuple(lines[0].split("\t")) != COUNTS_HEADER:
        header = "\t".join(COUNTS_HEADER)
        raise UserInputError(f"{path}: first line must be the header {header!r}")
    counts, splits = [], []
    for line_no, line in enumerate(lines[1:], 2):
        cells = line.split("\t")
        if len(cells) != 4 or cells[3] not in ("base", "new") or not cells[2].strip().isdigit():
            raise UserInputError(
                f"{path}:{line_no}: expected 'class_id<TAB>name<TAB>count<TAB>base|new', "
                f"got {line!r}"
            )
        if int(cells[0]) != len(counts):
            raise UserInputError(f"{path}:{line_no}: class ids must run 0, 1, 2, ... in order")
        counts.append(int(cells[2]))
        splits.append(cells[3])
    num_base = splits.count("base")
    if splits != ["base"] * num_base + ["new"] * (len(splits) - num_base):
        raise UserInputError(
            f"{path}: base classes must come first (ids 0..C_base-1), then new classes; "
            "rewrite the shards with `candle-dist make-shards`, which orders them so"
        )
    if num_classes is not None and len(counts) != num_classes:
        raise UserInputError(
            f"{path}: {len(counts)} classes, but the class-name file has {num_classes}; "
            "use the counts.tsv written with those class names"
        )
    return np.asarray(counts, dtype=np.int64), num_base
