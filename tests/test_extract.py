"""`candle-dist extract`: rank/worker splits, kill -9 resume, damaged inputs, store identity."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from candle_dist import cli
from candle_dist.errors import UserInputError
from candle_dist.features.clip_loading import load_clip
from candle_dist.features.extract import distributed_env, extract, resolve_device
from candle_dist.features.prompts import encode_classnames
from candle_dist.features.store import FeatureStore
from candle_dist.features.transforms import ImagePreprocessor, PreprocessSpec
from candle_dist.provenance import provenance
from tests.data_helpers import (
    jpeg_bytes,
    kill_after_first_shard,
    shard_spec,
    store_rows,
    tiny_model_config,
    write_jpeg_shards,
)
from tests.dist_utils import run_in_processes

NUM_SHARDS, PER_SHARD = 6, 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy machine: one thread avoids OpenMP stalls (100x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Six shards of random JPEGs and the store one process (two loader workers) makes of them."""
    root = tmp_path_factory.mktemp("extract")
    write_jpeg_shards(root / "shards", NUM_SHARDS, PER_SHARD, num_classes=6, num_base=5)
    config = tiny_model_config(root)
    spec = shard_spec(root / "shards", NUM_SHARDS)
    extract(
        spec,
        root / "ref",
        pretrained="none",
        model_config=config,
        batch_size=4,
        workers=2,
        progress=False,
    )
    return {"root": root, "spec": spec, "config": config, "ref": root / "ref"}


def _assert_same_rows(store: Path, reference: Path) -> None:
    rows, ref = store_rows(store), store_rows(reference)
    assert sorted(rows) == sorted(ref)
    for key, (label, feature) in ref.items():
        assert rows[key][0] == label
        np.testing.assert_allclose(rows[key][1], feature, rtol=1e-3, atol=2e-3)


def test_reference_store_matches_direct_encoding(data):
    store = FeatureStore(data["ref"])
    assert len(store) == NUM_SHARDS * PER_SHARD and store.num_views == 0
    assert store.num_base_classes == 5 and store.counts.tolist() == [6, 6, 6, 6, 6, 0]
    assert store.manifest["num_skipped"] == 0 and len(store.manifest["shards"]) == NUM_SHARDS
    # "none" weights come from a fixed seed, so this is the model extract used.
    model, preprocess, tokenizer = load_clip("", "none", data["config"])
    with tarfile.open(data["root"] / "shards" / "train-000002.tar") as tar:
        member = tar.extractfile("train_000012.jpg").read()
    image = preprocess(Image.open(io.BytesIO(member)).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        expected = model.encode_image(image)[0].numpy()
    row = store.keys.index("train_000012")
    np.testing.assert_allclose(store.features[row], expected, rtol=1e-2, atol=2e-3)
    text = encode_classnames(model, tokenizer, store.classnames, ["a photo of a {}."], 4)
    np.testing.assert_allclose(store.text_features, text.numpy(), rtol=1e-4, atol=1e-4)


def test_checkpoint_path_loads_those_weights(data):
    model, _, _ = load_clip("", "none", data["config"])
    state = {k: v + 0.01 for k, v in model.state_dict().items()}
    torch.save(state, data["root"] / "tiny.pt")
    loaded, _, _ = load_clip("", str(data["root"] / "tiny.pt"), data["config"])
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def _extract_rank(rank: int, world_size: int, spec: str, output: str, config: str) -> dict:
    return extract(
        spec,
        output,
        pretrained="none",
        model_config=config,
        batch_size=4,
        workers=0,
        progress=False,
    )


@pytest.mark.parametrize("world_size", [2, 3])
def test_multi_process_equals_one_process(data, world_size, tmp_path):
    out = tmp_path / "store"
    stats = run_in_processes(_extract_rank, world_size, data["spec"], str(out), str(data["config"]))
    assert sum(s["shards_done"] for s in stats) == NUM_SHARDS
    assert all(s["finalized"] for s in stats)
    _assert_same_rows(out, data["ref"])


def test_slurm_tasks_without_process_group_finalize_by_files(data, tmp_path, monkeypatch):
    out = tmp_path / "store"
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    finalized = []
    for rank in (1, 0):  # the last task to finish writes the store
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        stats = extract(
            data["spec"], out, pretrained="none", model_config=data["config"], progress=False
        )
        assert stats["shards_done"] == NUM_SHARDS // 2
        finalized.append(stats["finalized"])
    assert finalized == [False, True]
    _assert_same_rows(out, data["ref"])


def _extract_single_thread(spec: str, output: str, config: str) -> None:
    torch.set_num_threads(1)
    extract(
        spec,
        output,
        pretrained="none",
        model_config=config,
        batch_size=1,
        workers=0,
        progress=False,
    )


def test_kill_then_resume_equals_uninterrupted(data, tmp_path):
    out = tmp_path / "store"
    args = (data["spec"], str(out), str(data["config"]))
    records = out / "shards"
    done = kill_after_first_shard(_extract_single_thread, args, records, NUM_SHARDS)
    assert not (out / "manifest.json").exists()
    stats = extract(
        *args[:2], pretrained="none", model_config=args[2], batch_size=3, workers=1, progress=False
    )
    assert stats["shards_done"] == NUM_SHARDS - len(done) and stats["finalized"]
    for name, mtime in done.items():
        assert (records / name).stat().st_mtime_ns == mtime  # finished shards not redone
    assert not list(records.glob(".*tmp*"))
    _assert_same_rows(out, data["ref"])


def _damaged_shards(folder: Path) -> str:
    """Shard 0: good samples plus a corrupt JPEG, a missing and a bad label; shard 1 truncated."""
    from candle_dist.data.shards import write_shard

    rng = np.random.default_rng(1)
    good = jpeg_bytes(rng)
    samples = [
        {"__key__": "ok_0", "jpg": good, "cls": "0"},
        {"__key__": "corrupt", "jpg": good[:200] + bytes(300), "cls": "1"},
        {"__key__": "nolabel", "jpg": good},
        {"__key__": "badlabel", "jpg": good, "cls": "9"},
        {"__key__": "ok_1", "jpg": jpeg_bytes(rng), "cls": "1"},
    ]
    write_shard(folder / "train-000000.tar", samples)
    whole = folder / "whole.tar"
    write_shard(
        whole, [{"__key__": f"t_{i}", "jpg": jpeg_bytes(rng), "cls": "2"} for i in range(4)]
    )
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "t_2.jpg").offset_data + 100
    (folder / "train-000001.tar").write_bytes(data[:cut])
    whole.unlink()
    (folder / "classnames.txt").write_text("a\nb\nc\n")
    return f"{folder}/train-{{000000..000001}}.tar"


def test_damaged_samples_are_skipped_and_listed(data, tmp_path):
    spec = _damaged_shards(tmp_path)
    store = FeatureStore(
        extract(
            spec, tmp_path / "s", pretrained="none", model_config=data["config"], progress=False
        )["store"]
    )
    assert sorted(store.keys) == ["ok_0", "ok_1", "t_0", "t_1"]
    skipped = {item["key"]: item for item in store.manifest["skipped"]}
    assert set(skipped) == {"corrupt", "nolabel", "badlabel", "t_2"}
    assert store.manifest["num_skipped"] == 4
    assert "corrupt image" in skipped["corrupt"]["reason"]
    assert "missing cls" in skipped["nolabel"]["reason"]
    assert "outside the 3 class names" in skipped["badlabel"]["reason"]
    assert "truncated tar" in skipped["t_2"]["reason"]
    assert skipped["t_2"]["shard"] == "train-000001"
    assert store.counts.tolist() == [1, 1, 2]


def test_strict_stops_naming_shard_and_key(data, tmp_path, capsys):
    spec = _damaged_shards(tmp_path)
    with pytest.raises(UserInputError, match=r"train-000000\.tar: sample corrupt: corrupt image"):
        extract(
            spec,
            tmp_path / "s",
            pretrained="none",
            model_config=data["config"],
            strict=True,
            progress=False,
        )
    command = ["extract", "--shards", spec, "--output", str(tmp_path / "cli"), "--strict"]
    command += ["--pretrained", "none"]
    assert cli.main([*command, "--model-config", str(data["config"])]) == 2
    assert "sample corrupt: corrupt image" in capsys.readouterr().err


def test_other_model_into_existing_store_is_refused(data, tmp_path):
    other = tiny_model_config(tmp_path, "dataplane-tiny-wide", embed_dim=48)
    with pytest.raises(
        UserInputError,
        match=r"store .*ref \(extract\.json\) and this extract command do not match: dim 32 != 48",
    ):
        extract(data["spec"], data["ref"], pretrained="none", model_config=other, progress=False)


def test_views_are_stored_and_reproducible(data, tmp_path):
    spec = shard_spec(data["root"] / "shards", 2)
    first = extract(
        spec,
        tmp_path / "a",
        pretrained="none",
        model_config=data["config"],
        views=2,
        progress=False,
    )
    store = FeatureStore(first["store"])
    assert store.num_views == 2 and len(store) == 2 * PER_SHARD
    pick = store.views(np.arange(len(store)), np.arange(len(store)) % 2)
    assert pick.shape == (len(store), store.dim)
    assert not np.allclose(store.views(np.arange(3), 0), store.features[:3])
    again = extract(
        spec,
        tmp_path / "b",
        pretrained="none",
        model_config=data["config"],
        views=2,
        workers=0,
        batch_size=3,
        progress=False,
    )
    np.testing.assert_allclose(
        FeatureStore(again["store"]).views(np.arange(len(store)), 1),
        store.views(np.arange(len(store)), 1),
        atol=2e-3,
    )


def test_distributed_env_reads_torchrun_slurm_or_nothing():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    env = distributed_env(torchrun)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 4)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}
    env = distributed_env({**slurm, "SLURM_NTASKS_PER_NODE": "3(x2)"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 6, 2, 3)
    assert distributed_env({}).world_size == 1


def test_fast_preprocess_matches_open_clip():
    spec = PreprocessSpec((224, 224), (0.48, 0.45, 0.40), (0.27, 0.26, 0.28))
    reference = spec.open_clip_transform()
    rng = np.random.default_rng(0)
    for width, height in [(800, 600), (533, 801), (150, 100)]:
        for fmt in ("PNG", "JPEG"):
            data = jpeg_bytes(rng, width, height)
            image = Image.open(io.BytesIO(data)).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, quality=90)
            ours = ImagePreprocessor(spec)(buffer.getvalue())[0]
            plain = reference(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
            cosine = torch.nn.functional.cosine_similarity(ours.flatten(), plain.flatten(), 0)
            if fmt == "PNG":  # no reduced decode: open_clip's result up to one grey level
                assert (ours - plain).abs().max() < 0.02
            assert cosine > 0.99


def test_bad_pretrained_and_templates_are_user_errors(data):
    with pytest.raises(UserInputError, match="neither a checkpoint file nor an open_clip tag"):
        load_clip("", "no-such-tag", data["config"])
    with pytest.raises(UserInputError, match="exactly one"):
        extract(
            data["spec"],
            data["ref"],
            pretrained="none",
            model_config=data["config"],
            templates=["no slot"],
        )


def test_manifest_records_checksums(data):
    manifest = json.loads((data["ref"] / "manifest.json").read_text())
    for shard in manifest["shards"]:
        assert len(shard["sha256"]) == 64 and len(shard["input_sha256"]) == 64


def test_precision_is_applied_to_images_and_text_and_recorded(data, tmp_path):
    assert json.loads((data["ref"] / "manifest.json").read_text())["precision"] == "fp32"  # auto
    spec = shard_spec(data["root"] / "shards", 2)
    config = data["config"]
    stats = extract(
        spec,
        tmp_path / "s",
        pretrained="none",
        model_config=config,
        precision="bf16",
        progress=False,
    )
    store = FeatureStore(stats["store"])
    assert store.manifest["precision"] == "bf16"
    rows, ref = store_rows(store.path), store_rows(data["ref"])
    gap = max(np.abs(feature - ref[key][1]).max() for key, (_, feature) in rows.items())
    assert 5e-3 < gap < 0.2  # bf16 rounding, beyond the float16 storage of both
    model, _, tokenizer = load_clip("", "none", config)
    names, templates = store.classnames, ["a photo of a {}."]
    text = encode_classnames(model, tokenizer, names, templates, precision="bf16")
    np.testing.assert_allclose(store.text_features, text.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserInputError, match="precision 'fp32' != 'bf16'"):
        extract(
            data["spec"],
            data["ref"],
            pretrained="none",
            model_config=config,
            precision="bf16",
            progress=False,
        )


def test_precision_option_and_its_default_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision {auto,bf16,fp32}" in text and "(default: auto)" in text


@pytest.mark.parametrize(("visible", "index"), [(8, 5), (1, 0)])
def test_cuda_device_is_the_tasks_own_gpu_and_current(monkeypatch, visible, index):
    """SLURM task 5 of a node sees all 8 GPUs (its own is 5) or, bound one GPU per task, only its
    own (0); either way that GPU becomes the current device before any CUDA work, so the loader's
    pin-memory thread does not open a context on GPU 0 from every rank."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    task = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}
    for name in ("auto", "cuda"):
        current.clear()
        device = resolve_device(name, distributed_env(task))
        assert device == torch.device("cuda", index)
        assert current == [device]


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `candle-dist extract ARGV`."""
    capsys.readouterr()
    code = cli.main(["extract", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _one_error(lines: list[str]) -> str:
    assert len(lines) == 1 and lines[0].startswith("candle-dist extract: error: "), lines
    return lines[0]


def test_pretrained_is_required_and_random_weights_are_said(data, tmp_path, capsys):
    spec = shard_spec(data["root"] / "shards", 1)
    args = ["--shards", spec, "--model-config", str(data["config"]), "--workers", "0"]
    code, err = _cli(capsys, *args, "--output", str(tmp_path / "s"))
    assert code == 2
    assert "--pretrained is required" in _one_error(err) and "'none' for random" in err[0]
    assert not (tmp_path / "s").exists()
    with pytest.raises(UserInputError, match="--pretrained is required"):
        extract(spec, tmp_path / "s", model_config=data["config"], progress=False)
    code, err = _cli(capsys, *args, "--output", str(tmp_path / "s"), "--pretrained", "none")
    assert code == 0 and "store complete" in err[-1]
    assert "RANDOM WEIGHTS: --pretrained none" in err[-1]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--workers", "-1"], "--workers -1: give a whole number >= 0"),
        (["--batch-size", "0"], "--batch-size 0: give a whole number >= 1"),
        (["--views", "-1"], "--views -1: give a whole number >= 0"),
        (["--views", "1", "--seed", "-1"], "--seed -1: give a whole number >= 0"),
        (["--output", "{shards}"], "holds other files, no feature store"),
        (["--output", "{config}"], "is an existing file, not a folder"),
        (["--output", "{config}/store"], "dataplane-tiny.json is a file, not a folder"),
    ],
)
def test_bad_arguments_fail_before_anything_is_written(data, tmp_path, capsys, option, message):
    shards = data["root"] / "shards"
    before = sorted(p.name for p in shards.iterdir())
    paths = {"shards": shards, "config": data["config"]}
    option = [o.format(**paths) for o in option]
    argv = ["--shards", shard_spec(shards, 1), "--model-config", str(data["config"])]
    argv += ["--pretrained", "none", "--output", str(tmp_path / "s"), *option]
    code, err = _cli(capsys, *argv)
    assert code == 2 and message in _one_error(err)
    assert not (tmp_path / "s").exists() and sorted(p.name for p in shards.iterdir()) == before


def test_unwritable_output_is_one_line_error(data, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root writes into a read-only folder: what a read-only
        real = os.access  # file system answers instead
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    argv = ["--shards", data["spec"], "--model-config", str(data["config"]), "--pretrained"]
    code, err = _cli(capsys, *argv, "none", "--output", str(locked / "store"))
    assert code == 2 and f"no permission to write in {locked}" in _one_error(err)
    assert list(locked.iterdir()) == []


def _synthetic_shard(folder: Path, samples: int) -> Path:
    """One training shard written by make-shards (its samples record how many it holds)."""
    argv = ["make-shards", "--synthetic", "--num-classes", "3", "--image-size", "32"]
    argv += ["--max-per-class", str(samples // 3), "--val-per-class", "1", "--output", str(folder)]
    assert cli.main([*argv, "--samples-per-shard", str(samples)]) == 0
    return folder / "train-000000.tar"


def _cut_in_sample(path: Path, index: int) -> None:
    """Truncate a tar in the middle of its sample `index` (0-based, in tar order)."""
    with tarfile.open(path) as tar:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
        first = next(m for m in tar.getmembers() if m.name.split(".")[0] == keys[index])
    path.write_bytes(path.read_bytes()[: first.offset_data + 10])


def test_truncated_shard_says_how_many_samples_it_lost(data, tmp_path, capsys):
    shard = _synthetic_shard(tmp_path / "shards", 24)
    _cut_in_sample(shard, 10)
    argv = ["--shards", str(shard), "--model-config", str(data["config"]), "--pretrained", "none"]
    code, err = _cli(capsys, *argv, "--output", str(tmp_path / "s"), "--strict")
    assert code == 2 and "truncated tar" in err[-1] and "after sample 10" in err[-1]
    assert not (tmp_path / "s" / "manifest.json").exists()
    code, err = _cli(capsys, *argv, "--output", str(tmp_path / "s"))
    assert code == 0 and "14 LOST from train-000000.tar (truncated after sample 10)" in err[-1]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["num_samples"] == 10 and manifest["num_lost"] == 14
    assert not manifest["num_lost_is_lower_bound"]
    assert manifest["shards"][0]["expected_samples"] == 24
    assert manifest["shards"][0]["damaged_after"] == 10


def test_loss_of_unknown_size_says_the_rest_is_lost(data, tmp_path, capsys):
    spec = _damaged_shards(tmp_path)
    argv = ["--shards", spec, "--model-config", str(data["config"]), "--pretrained", "none"]
    code, err = _cli(capsys, *argv, "--output", str(tmp_path / "s"))
    assert code == 0 and "store complete" in err[-1] and "at least 4 sample(s) LOST" in err[-1]
    assert "train-000001.tar truncated after sample 2, the rest LOST" in err[-1]
    assert "3 LOST from train-000000.tar (corrupt image, missing cls" in err[-1]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["num_lost"] == 4 and manifest["num_lost_is_lower_bound"]
    # --strict on a store whose losses an earlier run accepted: refused, not completed
    (tmp_path / "s" / "manifest.json").unlink()
    code, err = _cli(capsys, *argv, "--output", str(tmp_path / "s"), "--strict")
    assert code == 2 and "skipped by an earlier run without --strict" in err[-1]
    assert not (tmp_path / "s" / "manifest.json").exists()


def _unlabelled_shards(folder: Path) -> str:
    from candle_dist.data.shards import write_shard

    rng = np.random.default_rng(3)
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(rng, 16, 16)} for i in range(5)]
    write_shard(folder / "train-000000.tar", samples)  # no cls
    write_shard(folder / "train-000001.tar", [])  # no samples at all
    (folder / "classnames.txt").write_text("a\nb\n")
    return f"{folder}/train-{{000000..000001}}.tar"


def test_store_without_samples_is_an_error_and_stays_incomplete(data, tmp_path, capsys):
    spec = _unlabelled_shards(tmp_path)
    argv = ["--shards", spec, "--model-config", str(data["config"]), "--pretrained", "none"]
    code, err = _cli(capsys, *argv, "--output", str(tmp_path / "s"))
    assert code == 2
    assert err[-1].startswith("candle-dist extract: error: no sample of the 2 shard(s)")
    assert "5 LOST from train-000000.tar (missing cls)" in err[-1]
    assert not (tmp_path / "s" / "manifest.json").exists()
    empty = f"{tmp_path}/train-000001.tar"
    code, err = _cli(capsys, "--shards", empty, *argv[2:], "--output", str(tmp_path / "e"))
    assert code == 2 and "the shards hold no samples" in err[-1]
    assert not (tmp_path / "e" / "manifest.json").exists()


def _extract_message(rank: int, world_size: int, spec: str, output: str, config: str) -> str:
    try:
        extract(spec, output, "", "none", model_config=config, workers=0, progress=False)
    except UserInputError as err:
        return str(err)
    return "finished"


def test_every_rank_stops_when_the_store_has_no_samples(data, tmp_path):
    spec = _unlabelled_shards(tmp_path)
    args = (spec, str(tmp_path / "s"), str(data["config"]))
    messages = run_in_processes(_extract_message, 2, *args)
    assert messages[0] == messages[1] and messages[0].startswith("no sample of the 2 shard(s)")


def test_other_class_list_into_existing_store_is_refused(data, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"other {i}\n" for i in range(6)))
    before = (data["ref"] / "extract.json").read_text()
    with pytest.raises(UserInputError) as caught:
        extract(
            data["spec"],
            data["ref"],
            pretrained="none",
            model_config=data["config"],
            classnames=names,
            progress=False,
        )
    message = str(caught.value)
    assert f"store {data['ref']} (extract.json) and this extract command do not match" in message
    assert "the class lists differ" in message and f"delete {data['ref']}" in message
    assert (data["ref"] / "extract.json").read_text() == before


def test_store_records_its_provenance(data):
    store = FeatureStore(data["ref"])
    expected = provenance(
        store.classnames,
        model="dataplane-tiny",
        pretrained="none",
        templates=["a photo of a {}."],
        dim=32,
    )
    assert store.provenance == expected == store.manifest["provenance"]
    identity = json.loads((data["ref"] / "extract.json").read_text())
    assert identity["provenance"] == expected
