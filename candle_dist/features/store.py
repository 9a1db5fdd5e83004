"""The feature store: one directory per split of memory-mapped image features and their labels.

Layout of a store directory (every file written under a temporary name, then renamed):

    manifest.json         written last: the store is complete when it exists; it records
                          the provenance (class list, CLIP, templates, dim) and every sample
                          lost (skipped as damaged, or unread past a truncation)
    shards/NAME.npy       features [n, D] of input shard NAME (float16 or float32)
    shards/NAME.views.npy augmented views [n, K, D], when extracted with --views K
    shards/NAME.tokens.npy token states [n, T, W] float16, when extracted with --tokens
                          (candle_dist/features/tokens.py says what they are)
    shards/NAME.json      the shard's record (keys, labels, skipped samples, checksums);
                          written after its arrays, so it marks the shard as done
    labels.npy, keys.txt  all samples' labels [N] and keys, in manifest shard order
    text_features.npy     [C, D] float32 text features of every class
    classnames.txt        one name per line, class id = line index
    counts.tsv            class_id, name, training count, base|new
    token_projection.npy, token_projection_bias.npy
                          with --tokens: [W, D] and [D] float32, the affine map of token 0
                          into the image embedding space (the manifest's `tokens` entry
                          records T, W, the --token-grid and the tower kind)

`FeatureStore(path)` opens it without reading the features: `store.features[idx]` reads the
rows it is asked for from the shard files, so iNaturalist-sized stores open at once.

Example:
    store = FeatureStore("features/train")
    x = store.features[np.array([3, 17, 42])]      # [3, D] float32
    y = store.labels[[3, 17, 42]]
    t = store.tokens[np.array([3, 17])]            # [2, T, W] float16, with --tokens
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from candle_dist.data.shards import (
    atomic_save_npy,
    atomic_write_text,
    read_classnames,
    read_counts_tsv,
    write_classnames,
    write_counts_tsv,
)
from candle_dist.errors import UserInputError
from candle_dist.provenance import provenance

FORMAT = "candle-dist-feature-store/1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
DTYPES = ("float16", "float32")
TOKENS_HEADER = 256  # bytes reserved for the .npy header of a streamed token file
TOKEN_PROJECTION = ("token_projection.npy", "token_projection_bias.npy")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def part_record_path(store: str | Path, name: str) -> Path:
    return Path(store) / SHARD_DIR / f"{name}.json"


def read_part_record(store: str | Path, name: str) -> dict | None:
    """The record of a finished shard, or None if the shard is not (completely) written."""
    path = part_record_path(store, name)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    folder = Path(store) / SHARD_DIR
    arrays = [record.get("features_file", "")]
    arrays += [record["tokens_file"]] if "tokens_file" in record else []
    return record if all((folder / name).is_file() for name in arrays) else None


def shard_loss(record: dict) -> tuple[int, bool]:
    """(samples of a finished shard that are not in the store, whether more may be lost): a
    shard whose samples recorded how many it held counts exactly; otherwise only the damaged
    samples read are counted, and a tar damaged part-way lost an unknown rest."""
    expected = record.get("expected_samples")
    if expected is not None:
        return max(0, int(expected) - int(record["num_samples"])), False
    return len(record.get("skipped", [])), record.get("damaged_after") is not None


class TokenWriter:
    """One shard's token states streamed into shards/NAME.tokens.npy, [n, T, W] float16.

    Rows go to a temporary file behind a reserved header, written with the final row count
    before the rename: 1,000 ViT-B/16 images hold 300 MB of tokens, too much to keep in memory
    for every shard in flight. A killed run leaves a temporary file, not a token file: the
    rerun writes the shard anew, and finishing the store removes the leftover.
    """

    def __init__(self, store: str | Path, name: str, count: int, width: int):
        folder = Path(store) / SHARD_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{name}.tokens.npy"
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.row_shape = (int(count), int(width))
        self.rows = 0
        self._handle = open(self.tmp, "wb")  # noqa: SIM115 (closed by close or discard)
        self._handle.write(bytes(TOKENS_HEADER))

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float16)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.path.name}: rows {rows.shape}, expected [n, *{self.row_shape}]"
            )
        self._handle.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> dict:
        """Write the header, move the file into place; returns the record's token fields."""
        self._handle.seek(0)
        self._handle.write(_npy_header((self.rows, *self.row_shape), np.float16, TOKENS_HEADER))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.tmp, self.path)
        return {
            "tokens_file": self.path.name,
            "tokens_sha256": file_sha256(self.path),
            "num_tokens": self.row_shape[0],
            "token_width": self.row_shape[1],
            "token_rows": self.rows,
        }

    def discard(self) -> None:
        self._handle.close()
        self.tmp.unlink(missing_ok=True)


def _npy_header(shape: tuple[int, ...], dtype, size: int) -> bytes:
    """A .npy (version 1.0) header of exactly `size` bytes, padded with spaces as numpy pads."""
    fields = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    text = repr({**fields, "shape": tuple(shape)}).encode("latin1")
    body = size - 10  # magic, version and the header length come first
    return b"\x93NUMPY\x01\x00" + body.to_bytes(2, "little") + text.ljust(body - 1) + b"\n"


def write_tokens(store: str | Path, name: str, tokens: np.ndarray) -> dict:
    """Write one shard's in-memory tokens [n, T, W]; returns the record's token fields."""
    tokens = np.asarray(tokens)
    writer = TokenWriter(store, name, tokens.shape[1], tokens.shape[2])
    writer.append(tokens)
    return writer.close()


def write_part(
    store: str | Path,
    name: str,
    features: np.ndarray,
    labels: np.ndarray,
    keys: Sequence[str],
    views: np.ndarray | None = None,
    dtype: str = "float16",
    tokens: dict | None = None,
    **info,
) -> dict:
    """Write one shard's arrays, then its record (which marks it done); returns the record.

    `tokens` are the fields of its token file, already written (TokenWriter, write_tokens).
    """
    folder = Path(store) / SHARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(labels) or len(labels) != len(keys):
        raise ValueError(
            f"shard {name}: features {features.shape}, {len(labels)} labels, {len(keys)} keys"
        )
    if tokens is not None and tokens["token_rows"] != len(keys):
        raise ValueError(f"shard {name}: {tokens['token_rows']} token rows, {len(keys)} keys")
    atomic_save_npy(folder / f"{name}.npy", features.astype(dtype))
    record = {
        "name": name,
        "num_samples": len(keys),
        "dim": int(features.shape[1]),
        "dtype": dtype,
        "features_file": f"{name}.npy",
        "sha256": file_sha256(folder / f"{name}.npy"),
        "num_views": 0,
        **(tokens or {}),
        **info,
        "keys": list(keys),
        "labels": [int(label) for label in labels],
    }
    if views is not None and views.shape[1] > 0:
        atomic_save_npy(folder / f"{name}.views.npy", np.asarray(views).astype(dtype))
        record["num_views"] = int(views.shape[1])
        record["views_file"] = f"{name}.views.npy"
        record["views_sha256"] = file_sha256(folder / f"{name}.views.npy")
    atomic_write_text(part_record_path(store, name), json.dumps(record))
    return record


def finalize_store(
    store: str | Path,
    part_names: Sequence[str],
    text_features: np.ndarray,
    classnames: Sequence[str],
    counts: np.ndarray | None,
    num_base_classes: int,
    *,
    tokens: dict | None = None,
    token_projection: tuple[np.ndarray, np.ndarray] | None = None,
    **manifest_fields,
) -> dict:
    """Gather the finished shards into labels/keys/counts/text files and write the manifest.

    `counts=None` counts the stored labels (a training split); otherwise they are the
    training counts given (an evaluation split). `tokens` describes the shards' token files
    (grid, tower: the manifest's `tokens` entry, T and W taken from the shards) and
    `token_projection` is the (matrix [W, D], bias [D]) stored beside them. Returns the manifest.
    """
    store = Path(store)
    text_features = np.asarray(text_features, dtype=np.float32)
    records = []
    for name in part_names:
        record = read_part_record(store, name)
        if record is None:
            raise UserInputError(f"{part_record_path(store, name)}: shard not finished; rerun")
        records.append(record)
    dims = {record["dim"] for record in records} | {int(text_features.shape[1])}
    views = {record["num_views"] for record in records}
    dtypes = {record["dtype"] for record in records}
    if len(dims) > 1 or len(views) > 1 or len(dtypes) > 1:
        raise UserInputError(
            f"{store}: shards disagree on dim {sorted(dims)}, views {sorted(views)} or dtype "
            f"{sorted(dtypes)}; extract into an empty directory"
        )
    dim = dims.pop()
    token_entry = _token_entry(store, records, tokens, token_projection, dim)
    num_classes = len(classnames)
    labels = np.asarray([lab for r in records for lab in r["labels"]], dtype=np.int64)
    if counts is None:
        counts = np.bincount(labels, minlength=num_classes)
    counts = np.asarray(counts, dtype=np.int64)
    if text_features.shape[0] != num_classes or len(counts) != num_classes:
        raise UserInputError(
            f"{store}: {num_classes} class names, {len(text_features)} text features, "
            f"{len(counts)} counts; they must match"
        )
    if not 0 <= num_base_classes <= num_classes:
        raise UserInputError(f"num_base_classes={num_base_classes} outside 0..{num_classes}")
    atomic_save_npy(store / "labels.npy", labels)
    atomic_write_text(store / "keys.txt", "".join(f"{k}\n" for r in records for k in r["keys"]))
    atomic_save_npy(store / "text_features.npy", text_features)
    write_classnames(store / "classnames.txt", classnames)
    write_counts_tsv(store / "counts.tsv", classnames, counts, num_base_classes)
    if token_projection is not None:
        for filename, array in zip(TOKEN_PROJECTION, token_projection, strict=True):
            atomic_save_npy(store / filename, np.asarray(array, dtype=np.float32))
    skipped = [{"shard": r["name"], **problem} for r in records for problem in r.get("skipped", [])]
    shard_fields = (
        "name",
        "url",
        "num_samples",
        "features_file",
        "sha256",
        "input_sha256",
        "expected_samples",
        "damaged_after",
        "damage",
    )
    losses = [shard_loss(r) for r in records]
    manifest = {
        "format": FORMAT,
        **manifest_fields,
        "provenance": provenance(
            classnames,
            model=manifest_fields.get("model"),
            pretrained=manifest_fields.get("pretrained"),
            templates=manifest_fields.get("templates"),
            dim=dim,
        ),
        "dim": dim,
        "dtype": dtypes.pop(),
        "num_views": views.pop(),
        "tokens": token_entry,
        "num_samples": len(labels),
        "num_classes": num_classes,
        "num_base_classes": int(num_base_classes),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_lost": sum(lost for lost, _ in losses),
        "num_lost_is_lower_bound": any(more for _, more in losses),
        "shards": [
            {
                **{k: r[k] for k in shard_fields if r.get(k) is not None},
                "num_skipped": len(r.get("skipped", [])),
                "num_lost": lost,
                **{k: r[k] for k in ("views_sha256", "tokens_sha256") if k in r},
            }
            for r, (lost, _) in zip(records, losses, strict=True)
        ],
    }
    atomic_write_text(store / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _token_entry(
    store: Path,
    records: list[dict],
    tokens: dict | None,
    projection: tuple[np.ndarray, np.ndarray] | None,
    dim: int,
) -> dict | None:
    """The manifest's `tokens` entry, checked against the shards' token files."""
    shapes = {(r.get("num_tokens"), r.get("token_width")) for r in records}
    if len(shapes) > 1 or any((count is None) == (tokens is not None) for count, _ in shapes):
        raise UserInputError(
            f"{store}: the shards' token files (T, W) {sorted(shapes, key=str)} do not agree "
            f"with each other or with this extraction ({'with' if tokens else 'without'} "
            "--tokens); extract into an empty directory"
        )
    if tokens is None:
        return None
    count, width = records[0]["num_tokens"], records[0]["token_width"]
    if projection is not None and (
        np.shape(projection[0]) != (width, dim) or np.shape(projection[1]) != (dim,)
    ):
        raise ValueError(
            f"token projection {np.shape(projection[0])} + {np.shape(projection[1])}, "
            f"expected ({width}, {dim}) + ({dim},)"
        )
    return {**tokens, "count": count, "width": width, "projection": projection is not None}


class ShardedRows:
    """Rows stored across several .npy files, read as one [N, ...] array of `dtype`.

    Files are memory-mapped when first touched and at most `max_open` stay mapped, so stores
    with thousands of shards stay under the open-file limit. Indexing takes an int, a slice
    or an integer array and returns `dtype` (float32; float16 keeps token reads half size).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        lengths: Sequence[int],
        row_shape: tuple[int, ...],
        dtype: type = np.float32,
    ):
        self.paths = list(paths)
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.row_shape = tuple(row_shape)
        self._dtype = np.dtype(dtype)
        self.max_open = 256
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.starts[-1]), *self.row_shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        # Pickled into loader workers: send paths, not mapped data.
        return {**self.__dict__, "_open": OrderedDict()}

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        if np.isscalar(index):
            return self.take(np.asarray([index]))[0]
        return self.take(np.asarray(index))

    def take(self, index: np.ndarray, sub: np.ndarray | None = None) -> np.ndarray:
        """Rows `index` (any int array shape); with `sub`, element `sub[i]` of row `index[i]`."""
        flat = np.asarray(index, dtype=np.int64).ravel()
        n = len(self)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"index out of range for {n} rows")
        flat = np.where(flat < 0, flat + n, flat)
        row_shape = self.row_shape if sub is None else self.row_shape[1:]
        out = np.empty((flat.size, *row_shape), dtype=self._dtype)
        part = np.searchsorted(self.starts, flat, side="right") - 1
        for p in np.unique(part):
            where = np.nonzero(part == p)[0]
            local = flat[where] - self.starts[p]
            rows = self._mapped(int(p))
            out[where] = rows[local] if sub is None else rows[local, sub.ravel()[where]]
        return out.reshape(*np.shape(index), *row_shape)

    def _mapped(self, p: int) -> np.ndarray:
        if p in self._open:
            self._open.move_to_end(p)
            return self._open[p]
        rows = np.load(self.paths[p], mmap_mode="r")
        expected = (int(self.starts[p + 1] - self.starts[p]), *self.row_shape)
        if rows.shape != expected:
            raise UserInputError(
                f"{self.paths[p]}: shape {rows.shape}, manifest says {expected}; the store is "
                "damaged: delete this shard's files and rerun the extraction"
            )
        self._open[p] = rows
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return rows


class FeatureStore:
    """A finished feature store, opened read-only (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise UserInputError(
                f"{manifest_path}: no feature store here (or its extraction has not finished); "
                "run `candle-dist extract --output "
                f"{self.path} ...`, or rerun the same command to finish it"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise UserInputError(
                f"{manifest_path}: not valid JSON ({err}); rerun extract"
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise UserInputError(
                f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}; "
                "re-extract the features with this version of candle-dist"
            )
        self.dim = int(self.manifest["dim"])
        self.num_views = int(self.manifest.get("num_views", 0))
        self.num_base_classes = int(self.manifest["num_base_classes"])
        shards = self.manifest["shards"]
        folder = self.path / SHARD_DIR
        lengths = [int(s["num_samples"]) for s in shards]
        self.features = ShardedRows(
            [folder / s["features_file"] for s in shards], lengths, (self.dim,)
        )
        self._views = (
            ShardedRows(
                [folder / f"{s['name']}.views.npy" for s in shards],
                lengths,
                (self.num_views, self.dim),
            )
            if self.num_views
            else None
        )
        self.token_info: dict | None = self.manifest.get("tokens")
        self.tokens: ShardedRows | None = None
        self.token_projection: tuple[np.ndarray, np.ndarray] | None = None
        if self.token_info is not None:
            count, width = int(self.token_info["count"]), int(self.token_info["width"])
            self.tokens = ShardedRows(
                [folder / f"{s['name']}.tokens.npy" for s in shards],
                lengths,
                (count, width),
                np.float16,
            )
            if self.token_info.get("projection"):
                matrix, bias = TOKEN_PROJECTION
                self.token_projection = (
                    self._load_npy(matrix, (width, self.dim)).astype(np.float32),
                    self._load_npy(bias, (self.dim,)).astype(np.float32),
                )
        self.labels = self._load_npy("labels.npy", (len(self.features),)).astype(np.int64)
        self.classnames = read_classnames(self.path / "classnames.txt")
        self.counts, _ = read_counts_tsv(self.path / "counts.tsv", len(self.classnames))
        self.text_features = self._load_npy(
            "text_features.npy", (len(self.classnames), self.dim)
        ).astype(np.float32)
        self._keys: list[str] | None = None

    def _load_npy(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        path = self.path / name
        try:
            array = np.load(path)
        except (OSError, ValueError) as err:
            raise UserInputError(f"{path}: unreadable ({err}); rerun extract to rebuild") from None
        if array.shape != shape:
            raise UserInputError(
                f"{path}: shape {array.shape}, manifest says {shape}; rerun extract to rebuild"
            )
        return array

    def __len__(self) -> int:
        return len(self.features)

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}: {len(self)} samples, dim {self.dim}, "
            f"{self.num_classes} classes ({self.num_base_classes} base), {self.num_views} views)"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def provenance(self) -> dict:
        """What the store was made from (candle_dist.provenance): class list, CLIP, templates,
        dim; {} for stores written before it was recorded."""
        return dict(self.manifest.get("provenance") or {})

    @property
    def logit_scale(self) -> float | None:
        """The CLIP model's log logit scale (s = exp of it), when the store recorded it."""
        value = self.manifest.get("logit_scale")
        return None if value is None else float(value)

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            path = self.path / "keys.txt"
            keys = path.read_text(encoding="utf-8").splitlines()
            if len(keys) != len(self):
                raise UserInputError(f"{path}: {len(keys)} keys for {len(self)} samples; rerun")
            self._keys = keys
        return self._keys

    def views(self, indices, view_ids) -> np.ndarray:
        """Augmented view `view_ids[i]` of sample `indices[i]`: [len, D] float32."""
        if self._views is None:
            raise UserInputError(
                f"{self.path}: extracted without augmented views; rerun "
                "`candle-dist extract --views K` into a new store"
            )
        indices = np.asarray(indices, dtype=np.int64)
        view_ids = np.broadcast_to(np.asarray(view_ids, dtype=np.int64), indices.shape)
        if view_ids.size and (view_ids.min() < 0 or view_ids.max() >= self.num_views):
            raise IndexError(f"view ids must lie in 0..{self.num_views - 1}")
        return self._views.take(indices, view_ids)

    @classmethod
    def from_arrays(
        cls,
        path: str | Path,
        features: np.ndarray,
        labels: np.ndarray,
        keys: Sequence[str] | None,
        text_features: np.ndarray,
        classnames: Sequence[str],
        counts: np.ndarray | None,
        num_base_classes: int,
        *,
        views: np.ndarray | None = None,
        dtype: str = "float32",
        samples_per_shard: int = 100_000,
        tokens: np.ndarray | None = None,
        token_projection: tuple[np.ndarray, np.ndarray] | None = None,
        token_info: dict | None = None,
        **manifest_fields,
    ) -> FeatureStore:
        """Write a store from in-memory arrays (tests, demos, synthetic features) and open it.

        `keys=None` numbers the samples; `counts=None` counts `labels`; `manifest_fields`
        (e.g. model=..., logit_scale=...) go into the manifest. `tokens` [N, T, W] are stored
        as float16 with `token_projection` (matrix [W, D], bias [D]) beside them; `token_info`
        fills their manifest entry (grid, tower, source_grid; unknown: None).
        """
        path = Path(path)
        if (path / MANIFEST).exists():
            raise UserInputError(f"{path}: already holds a feature store; write to a new path")
        labels = np.asarray(labels, dtype=np.int64)
        keys = [f"{i:09d}" for i in range(len(labels))] if keys is None else list(keys)
        names = []
        for start in range(0, max(len(labels), 1), samples_per_shard):
            stop = start + samples_per_shard
            name = f"part-{start // samples_per_shard:06d}"
            part_tokens = None
            if tokens is not None:
                part_tokens = write_tokens(path, name, np.asarray(tokens)[start:stop])
            write_part(
                path,
                name,
                np.asarray(features)[start:stop],
                labels[start:stop],
                keys[start:stop],
                views=None if views is None else np.asarray(views)[start:stop],
                dtype=dtype,
                tokens=part_tokens,
            )
            names.append(name)
        fields = {"model": "arrays", "pretrained": "none", "split": "train", **manifest_fields}
        token_entry = None
        if tokens is not None:
            token_entry = {"tower": None, "grid": None, "source_grid": None, **(token_info or {})}
        finalize_store(
            path,
            names,
            text_features,
            classnames,
            counts,
            num_base_classes,
            tokens=token_entry,
            token_projection=token_projection,
            **fields,
        )
        return cls(path)
