"""`candle-dist make-shards`: every input format round-trips every sample; splits, tails, resume."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from candle_dist import cli
from candle_dist.data import make_shards as make_shards_module
from candle_dist.data.shards import read_classnames, read_counts_tsv
from tests.data_helpers import jpeg_bytes


def _png_bytes(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((rng.random((12, 10, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _read_split(output: Path, split: str) -> list[dict]:
    """Every sample of a split, read back with webdataset itself."""
    urls = [str(p) for p in sorted(output.glob(f"{split}-*.tar"))]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _image_field(sample: dict) -> bytes:
    return next(sample[f] for f in ("jpg", "png") if f in sample)


def _check_round_trip(output: Path, split: str, expected: dict[str, tuple[bytes, str]]) -> None:
    """`expected`: source path -> (file bytes, class name); each must appear exactly once."""
    names = read_classnames(output / "classnames.txt")
    samples = _read_split(output, split)
    seen = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        label = int(sample["cls"])
        assert names[label] == meta["class"]
        assert meta["path"] not in seen
        seen[meta["path"]] = (_image_field(sample), names[label])
    assert seen == expected


def _make(*args: str) -> int:
    return cli.main(["make-shards", *args])


@pytest.fixture
def folder_tree(tmp_path) -> tuple[Path, dict]:
    """Class-per-folder train and val trees (JPEG and PNG, one nested sub-folder)."""
    rng = np.random.default_rng(0)
    files = {"train": {}, "val": {}}
    for split, per_class in (("train", 4), ("val", 2)):
        for c, folder in enumerate(["golden_retriever", "tabby_cat", "zebra"]):
            for i in range(per_class + c):
                sub = "more/" if i == 0 else ""
                ext = "png" if i == 1 else "jpg"
                data = _png_bytes(rng) if ext == "png" else jpeg_bytes(rng, 16, 12)
                rel = f"{folder}/{sub}img{i}.{ext}"
                (tmp_path / split / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / split / rel).write_bytes(data)
                files[split][rel] = (data, folder.replace("_", " "))
    return tmp_path, files


def test_from_folder_round_trips(folder_tree):
    root, files = folder_tree
    out = root / "out"
    assert (
        _make(
            "--from-folder",
            str(root / "train"),
            "--val",
            str(root / "val"),
            "--output",
            str(out),
            "--samples-per-shard",
            "4",
        )
        == 0
    )
    assert read_classnames(out / "classnames.txt") == ["golden retriever", "tabby cat", "zebra"]
    _check_round_trip(out, "train", files["train"])
    _check_round_trip(out, "val", files["val"])
    counts, num_base = read_counts_tsv(out / "counts.tsv")
    assert counts.tolist() == [4, 5, 6] and num_base == 3
    assert len(list(out.glob("train-*.tar"))) == 4  # 15 samples, 4 per shard


def test_base_classes_file_renumbers_base_first(folder_tree):
    root, files = folder_tree
    (root / "base.txt").write_text("zebra\n1\n")  # a name and a source id
    out = root / "out"
    _make(
        "--from-folder",
        str(root / "train"),
        "--val",
        str(root / "val"),
        "--base-classes",
        str(root / "base.txt"),
        "--output",
        str(out),
    )
    names = read_classnames(out / "classnames.txt")
    assert names == ["tabby cat", "zebra", "golden retriever"]
    counts, num_base = read_counts_tsv(out / "counts.tsv")
    assert counts.tolist() == [5, 6, 0] and num_base == 2
    train = {p: v for p, v in files["train"].items() if not p.startswith("golden")}
    _check_round_trip(out, "train", train)
    _check_round_trip(out, "val", files["val"])


def test_from_list_round_trips_with_subsampling(tmp_path):
    rng = np.random.default_rng(1)
    lines, expected, names = [], {}, ["tench", "goldfish", "great white shark"]
    for c in range(3):
        for i in range(10):
            rel = f"train/n0{c}/x{i}.JPEG"
            data = jpeg_bytes(rng, 16, 16)
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(data)
            lines.append(f"{rel} {c}")
            expected[rel] = (data, names[c])
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(lines[::5]) + "\n")
    (tmp_path / "names.txt").write_text("".join(f"n0{c} {n}\n" for c, n in enumerate(names)))
    common = [
        "--from-list",
        str(tmp_path / "train.txt"),
        "--root",
        str(tmp_path),
        "--classnames",
        str(tmp_path / "names.txt"),
        "--classnames-have-ids",
    ]
    out = tmp_path / "all"
    _make(*common, "--val", str(tmp_path / "val.txt"), "--output", str(out))
    _check_round_trip(out, "train", expected)
    _check_round_trip(out, "val", {p: expected[p] for p in (x.split()[0] for x in lines[::5])})
    tail = tmp_path / "tail"
    _make(*common, "--max-per-class", "8", "--imbalance-ratio", "0.25", "--output", str(tail))
    counts, _ = read_counts_tsv(tail / "counts.tsv")
    assert counts.tolist() == [8, 4, 2]  # 8 * 0.25^(i/2)
    kept = {json.loads(s["json"])["path"]: s["jpg"] for s in _read_split(tail, "train")}
    assert len(kept) == 14 and all(expected[p][0] == data for p, data in kept.items())


def test_from_inat_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    categories = [{"id": 10, "name": "Zebra"}, {"id": 3, "name": "Apis"}, {"id": 7, "name": "Bos"}]
    doc = {"images": [], "annotations": [], "categories": categories}
    expected = {}
    for i in range(9):
        category = categories[i % 3]
        rel = f"train_val_images/{category['name']}/{i}.jpg"
        data = jpeg_bytes(rng, 16, 16)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        doc["images"].append({"id": 100 + i, "file_name": rel})
        doc["annotations"].append({"id": i, "image_id": 100 + i, "category_id": category["id"]})
        expected[rel] = (data, category["name"])
    (tmp_path / "train.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert _make("--from-inat", str(tmp_path / "train.json"), "--output", str(out)) == 0
    assert read_classnames(out / "classnames.txt") == ["Apis", "Bos", "Zebra"]  # by category id
    _check_round_trip(out, "train", expected)


def test_synthetic_long_tail_new_classes_and_determinism(tmp_path):
    args = [
        "--synthetic",
        "--num-classes",
        "12",
        "--num-new",
        "3",
        "--max-per-class",
        "20",
        "--imbalance-ratio",
        "0.1",
        "--val-per-class",
        "2",
        "--samples-per-shard",
        "16",
    ]
    out = tmp_path / "a"
    assert _make(*args, "--output", str(out)) == 0
    counts, num_base = read_counts_tsv(out / "counts.tsv")
    assert num_base == 9
    assert counts.tolist() == [int(20 * 0.1 ** (i / 8)) for i in range(9)] + [0, 0, 0]
    names = read_classnames(out / "classnames.txt")
    train, val = _read_split(out, "train"), _read_split(out, "val")
    assert np.bincount([int(s["cls"]) for s in train], minlength=12).tolist() == counts.tolist()
    assert np.bincount([int(s["cls"]) for s in val]).tolist() == [2] * 12
    for sample in train + val:
        assert json.loads(sample["json"])["class"] == names[int(sample["cls"])]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)
    assert len({s["__key__"] for s in train + val}) == len(train) + len(val)
    again = tmp_path / "b"
    _make(*args, "--output", str(again))
    for path in sorted(out.glob("*.tar")):
        assert (again / path.name).read_bytes() == path.read_bytes()


def test_resume_rewrites_only_missing_shards(tmp_path):
    args = [
        "--synthetic",
        "--num-classes",
        "6",
        "--max-per-class",
        "10",
        "--val-per-class",
        "1",
        "--samples-per-shard",
        "8",
        "--output",
        str(tmp_path),
    ]
    _make(*args)
    shards = sorted(tmp_path.glob("train-*.tar"))
    assert len(shards) == 8
    original = shards[3].read_bytes()
    shards[3].unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in shards if p.exists()}
    _make(*args)
    assert shards[3].read_bytes() == original
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert _make(*args[:-2], "--seed", "1", "--output", str(tmp_path)) == 2  # another plan
    assert _make(*args[:-2], "--seed", "1", "--output", str(tmp_path), "--overwrite") == 0
    assert shards[3].read_bytes() != original


def test_byte_limit_cuts_shards(folder_tree):
    root, files = folder_tree
    out = root / "out"
    _make("--from-folder", str(root / "train"), "--output", str(out), "--max-shard-bytes", "6K")
    assert len(list(out.glob("train-*.tar"))) > 3
    _check_round_trip(out, "train", files["train"])


def test_bad_inputs_are_user_errors(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("a.jpg 0\nb.jpg two\n")
    (tmp_path / "names.txt").write_text("x\n")
    assert _make("--from-list", str(tmp_path / "list.txt"), "--output", str(tmp_path)) == 2
    assert "--classnames" in capsys.readouterr().err
    code = _make(
        "--from-list",
        str(tmp_path / "list.txt"),
        "--classnames",
        str(tmp_path / "names.txt"),
        "--output",
        str(tmp_path),
    )
    assert code == 2 and "list.txt:2" in capsys.readouterr().err


def _error_line(capsys) -> str:
    """The one stderr line of a refused run (anything more fails the test)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("candle-dist make-shards: error: "), err
    return err[0]


def _left(root: Path, name: str = "out") -> list[str]:
    """What a run left under `root` named like its output (the output, OUTPUT.partial)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(name))


def test_empty_class_folders_must_be_declared_new(folder_tree, capsys):
    root, files = folder_tree
    (root / "train" / "aardvark").mkdir()  # sorts first, but a new class gets the last id
    (root / "val" / "aardvark").mkdir()
    (root / "val" / "aardvark" / "a.jpg").write_bytes(files["val"]["zebra/img2.jpg"][0])
    common = ["--from-folder", str(root / "train"), "--val", str(root / "val")]
    assert _make(*common, "--output", str(root / "out")) == 2
    line = _error_line(capsys)
    assert "1 base class(es) without training images: 'aardvark'" in line
    assert "--new-classes FILE" in line
    assert _left(root) == []
    (root / "new.txt").write_text("aardvark\n")
    assert (
        _make(*common, "--new-classes", str(root / "new.txt"), "--output", str(root / "out")) == 0
    )
    names = read_classnames(root / "out" / "classnames.txt")
    assert names == ["golden retriever", "tabby cat", "zebra", "aardvark"]
    counts, num_base = read_counts_tsv(root / "out" / "counts.tsv")
    assert counts.tolist() == [4, 5, 6, 0] and num_base == 3
    assert [int(s["cls"]) for s in _read_split(root / "out", "val")].count(3) == 1
    capsys.readouterr()
    (root / "bad.txt").write_text("aardvark\nplatypus\n")
    assert _make(*common, "--new-classes", str(root / "bad.txt"), "--output", str(root / "o2")) == 2
    assert "'platypus' is neither a class name nor a class id" in _error_line(capsys)


def test_no_training_images_is_an_error(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "tree" / name).mkdir(parents=True)
    assert _make("--from-folder", str(tmp_path / "tree"), "--output", str(tmp_path / "out")) == 2
    assert "0 training images: every class folder is empty" in _error_line(capsys)
    doc = {"images": [], "categories": [{"id": 1, "name": "Apis"}]}  # no annotations
    (tmp_path / "train.json").write_text(json.dumps(doc))
    assert (
        _make("--from-inat", str(tmp_path / "train.json"), "--output", str(tmp_path / "out")) == 2
    )
    assert "0 training images: the JSON has no annotations" in _error_line(capsys)
    assert _left(tmp_path) == []


def test_files_that_are_not_images_are_skipped_listed_or_refused(folder_tree, capsys):
    root, files = folder_tree
    (root / "train" / "zebra" / "x.jpg").write_text("a text file named like a JPEG\n")
    args = ["--from-folder", str(root / "train"), "--output", str(root / "out")]
    assert _make(*args, "--strict") == 2
    line = _error_line(capsys)
    assert "1 file(s) are not images by content" in line and "zebra/x.jpg" in line
    assert _left(root) == []
    assert _make(*args) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 file(s) SKIPPED as not images" in last and "zebra/x.jpg" in last
    skipped = (root / "out" / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 2 and "zebra/x.jpg" in skipped[1]
    _check_round_trip(root / "out", "train", files["train"])  # every real image, no text file


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--samples-per-shard", "0"], "--samples-per-shard 0: give a whole number >= 1"),
        (["--val-per-class", "0"], "--val-per-class 0: give a whole number >= 1"),
        (["--seed", "-1"], "--seed -1: give a whole number >= 0"),
        (["--imbalance-ratio", "2"], "--imbalance-ratio 2.0: give min/max count"),
        (["--num-new", "-1"], "--num-new -1"),
    ],
)
def test_bad_numbers_are_one_line_errors_before_any_folder(tmp_path, capsys, option, message):
    assert (
        _make("--synthetic", "--num-classes", "3", "--output", str(tmp_path / "out"), *option) == 2
    )
    assert message in _error_line(capsys)
    assert _left(tmp_path) == []


def test_unwritable_output_is_one_line_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("in the way\n")
    args = ["--synthetic", "--num-classes", "3", "--max-per-class", "2", "--output"]
    assert _make(*args, str(tmp_path / "file")) == 2
    assert "file is an existing file, not a folder" in _error_line(capsys)
    assert _make(*args, str(tmp_path / "file" / "out")) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in _error_line(capsys)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root writes into a read-only folder: what a read-only
        real = os.access  # file system answers instead
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    assert _make(*args, str(locked / "out")) == 2
    assert f"no permission to write in {locked}" in _error_line(capsys)
    assert list(locked.iterdir()) == [] and (tmp_path / "file").read_text() == "in the way\n"


def test_failed_run_leaves_nothing_finished_and_rerun_completes(tmp_path, capsys, monkeypatch):
    args = ["--synthetic", "--num-classes", "4", "--max-per-class", "6", "--val-per-class", "1"]
    args += ["--samples-per-shard", "5", "--output", str(tmp_path / "out")]
    real_write, written = make_shards_module.write_shard, []

    def full_disk(path, samples):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        real_write(path, samples)

    monkeypatch.setattr(make_shards_module, "write_shard", full_disk)
    assert _make(*args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train-000001.tar: No space left on device; free space" in last
    assert _left(tmp_path) == ["out.partial"]  # resumable, and named as unfinished
    assert not (tmp_path / "out.partial" / "classnames.txt").exists()
    monkeypatch.undo()
    assert _make(*args) == 0
    assert _left(tmp_path) == ["out"]
    assert _make(*args[:-1], str(tmp_path / "ref")) == 0  # the same command, never interrupted
    for path in (tmp_path / "ref").glob("*.tar"):
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes()
    samples = _read_split(tmp_path / "out", "train")
    assert len(samples) == 24
    assert {json.loads(s["json"])["shard_samples"] for s in samples} == {5, 4}  # 5+5+5+5+4
    # in place: a refused rerun changes nothing; a failing one leaves no class files behind
    assert _make(*args[:-2], "--seed", "1", "--output", str(tmp_path / "out")) == 2
    assert (tmp_path / "out" / "classnames.txt").exists()
    monkeypatch.setattr(make_shards_module, "write_shard", full_disk)
    written.clear()
    assert _make(*args[:-2], "--seed", "1", "--overwrite", "--output", str(tmp_path / "out")) == 2
    assert not (tmp_path / "out" / "classnames.txt").exists()
