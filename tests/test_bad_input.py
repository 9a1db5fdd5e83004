"""No silent wrong results: every bad input to train, eval, predict (and demo, bench) stops with
exit 2 and one error line naming what is wrong and the fix, before any work, leaving nothing that
looks finished; damaged checkpoints are skipped for complete ones; Ctrl-C checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from candle_dist.cli import main
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.features.store import FeatureStore

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["head.num_heads=4", "optim.batch_size=16", "train.log_every=1"]
CLIP = {"model": "ViT-B-16", "pretrained": "openai", "templates": ["a photo of a {}."]}


def _store(path, classes=12, seed=0, classnames=None, **manifest):
    """A train and a val store of `classes` synthetic classes (dim 16) under `path`."""
    s = make_synthetic_features(
        classes, 16, imbalance_ratio=4, max_count=12, num_new=2, val_per_class=2, seed=seed
    )
    common = dict(
        text_features=s.text_features.numpy(),
        classnames=classnames or s.classnames,
        num_base_classes=s.num_base_classes,
        **manifest,
    )
    features, labels = s.train_features.numpy(), s.train_labels.numpy()
    FeatureStore.from_arrays(path / "train", features, labels, None, counts=None, **common)
    features, labels = s.val_features.numpy(), s.val_labels.numpy()
    counts = s.counts.numpy()
    FeatureStore.from_arrays(path / "val", features, labels, None, counts=counts, **common)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Stores: `a` (12 classes, ViT-B-16), `b` (8 classes), `renamed` (a's features, the
    class names reversed), `b32` (a's, extracted with ViT-B-32); and `run`, a finished
    run on `a` (5 steps, checkpoints at 4 and 5)."""
    root = tmp_path_factory.mktemp("bad_input")
    a = _store(root / "a", **CLIP)
    names = FeatureStore(a / "train").classnames
    stores = {
        "a": a,
        "b": _store(root / "b", classes=8, seed=1, **CLIP),
        "renamed": _store(root / "renamed", classnames=names[::-1], **CLIP),
        "b32": _store(root / "b32", **{**CLIP, "model": "ViT-B-32"}),
    }
    run = root / "run"
    assert main(_train(a, run, "optim.epochs=1", "train.checkpoint_every=4")) == 0
    return {**stores, "run": run}


def _errors(capsys) -> list[str]:
    """Lines on stderr that are not progress bars."""
    err = capsys.readouterr().err.replace("\r", "\n")
    return [line for line in err.splitlines() if line.strip() and "it/s" not in line]


def _one_error(capsys, command: str, *phrases: str) -> str:
    lines = _errors(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"candle-dist {command}: error: "), lines
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def _train(store, output, *extra) -> list[str]:
    return ["train", f"data.train={store / 'train'}", f"train.output={output}", *TRAIN, *extra]


def _copy_run(world, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return run


# ----------------------------------------------------------------------------- provenance
def test_eval_against_a_store_of_other_classes(world, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(world["run"] / "final"), "--features"]
    assert main([*argv, str(world["b"] / "val"), "--output", str(out)]) == 2
    _one_error(capsys, "eval", "num_classes 12 != 8", "store", "checkpoint", "extracted with")
    assert main([*argv, str(world["renamed"] / "val"), "--output", str(out)]) == 2
    _one_error(capsys, "eval", "the class lists differ")
    assert main([*argv, str(world["b32"] / "val"), "--output", str(out)]) == 2
    _one_error(capsys, "eval", "model 'ViT-B-16' != 'ViT-B-32'")
    # a checkpoint written before provenance was recorded: its class list and CLIP still count
    old = tmp_path / "old_final"
    shutil.copytree(world["run"] / "final", old)
    meta = json.loads((old / "head_meta.json").read_text())
    (old / "head_meta.json").write_text(
        json.dumps({k: v for k, v in meta.items() if k != "provenance"})
    )
    argv = ["eval", "--checkpoint", str(old), "--features"]
    assert main([*argv, str(world["renamed"] / "val"), "--output", str(out)]) == 2
    _one_error(capsys, "eval", "the class lists differ")
    assert not out.exists()


def test_every_artifact_records_the_training_store_provenance(world):
    from candle_dist.classifier import ExportedClassifier
    from candle_dist.train.data import store_provenance

    want = store_provenance(FeatureStore(world["a"] / "train"))
    assert want["model"] == "ViT-B-16" and want["num_classes"] == 12
    final = world["run"] / "final"
    assert json.loads((final / "head_meta.json").read_text())["provenance"] == want
    assert ExportedClassifier.load(final / "classifier.pt").provenance == want
    for step in ("step_000000004", "step_000000005"):
        state = json.loads((world["run"] / "checkpoints" / step / "trainer.json").read_text())
        assert state["provenance"] == want


def test_train_with_a_validation_store_of_other_classes(world, tmp_path, capsys):
    argv = [*_train(world["a"], tmp_path / "out"), f"data.val={world['b'] / 'val'}"]
    assert main(argv) == 2
    _one_error(capsys, "train", "training store", "validation store", "num_classes 12 != 8")
    assert not (tmp_path / "out").exists()


def test_resume_on_a_store_of_other_classes(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path)
    assert main([*_train(world["renamed"], run, "optim.epochs=2"), "--resume"]) == 2
    _one_error(capsys, "train", "checkpoint", "training store", "the class lists differ")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (world["run"] / "checkpoints").iterdir()
    )


def test_predict_on_features_of_another_clip(world, tmp_path, capsys):
    final = str(world["run"] / "final")
    out = tmp_path / "p.jsonl"
    argv = ["predict", "--checkpoint", final, "--output", str(out)]
    assert main([*argv, str(world["b32"] / "val")]) == 2
    _one_error(capsys, "predict", "model 'ViT-B-16' != 'ViT-B-32'", "the checkpoint's CLIP")
    images = tmp_path / "images"
    images.mkdir()
    assert main(["predict", "--checkpoint", final, str(images), "--model", "ViT-L-14"]) == 2
    _one_error(capsys, "predict", "--model/--pretrained", "model 'ViT-B-16' != 'ViT-L-14'")
    assert not out.exists()
    # a store of the same CLIP with another class list is fine: its labels are not used
    assert main([*argv, str(world["b"] / "val")]) == 0
    assert len(out.read_text().splitlines()) == len(FeatureStore(world["b"] / "val"))


# ------------------------------------------------------------------------- config numbers
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.epochs=0", "optim.epochs=0 must be at least 1: a run without an epoch"),
        ("optim.lr=-0.1", "optim.lr=-0.1 must be positive"),
        ("optim.lr=nan", "optim.lr=nan must be a finite number"),
        ("optim.batch_size=0", "optim.batch_size=0 must be at least 1"),
        ("optim.momentum=1.5", "optim.momentum=1.5 must be in [0, 1)"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0 must be at least 1"),
        ("train.log_every=-1", "train.log_every=-1 must be at least 1"),
        ("train.seed=-1", "train.seed=-1 must be 0 or more"),
        ("train.eval_batch_size=0", "train.eval_batch_size=0 must be at least 1"),
        ("train.class_sample_fraction=2", "train.class_sample_fraction=2.0 must be in [0, 1]"),
        ("head.attn_dropout=1", "head.attn_dropout=1.0 must be in [0, 1)"),
        ("head.mask=diagonal", "unknown head.mask='diagonal': choose one of none, "),
        ("loss.name=hinge", "unknown loss.name='hinge': choose one of cla, "),
    ],
)
def test_nonsensical_config_values(world, tmp_path, capsys, override, message):
    assert main(_train(world["a"], tmp_path / "out", override)) == 2
    _one_error(capsys, "train", message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-steps", "0"], "--max-steps 0: give 1 or more"),
        (["eval", "--features", "{a}/val", "--batch-size", "0"], "--batch-size 0: give 1 or more"),
        (["predict", "{a}/val", "--top-k", "0"], "--top-k 0: give 1 or more"),
        (["predict", "{a}/val", "--batch-size", "-1"], "--batch-size -1: give 1 or more"),
    ],
)
def test_nonsensical_options(world, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.format(a=world["a"]) for a in argv]
    if argv[0].startswith("--"):
        argv = [*_train(world["a"], out), *argv]
    else:
        argv = [*argv, "--checkpoint", str(world["run"] / "final"), "--output", str(out)]
    assert main(argv) == 2
    _one_error(capsys, argv[0], message)
    assert not out.exists()


# ------------------------------------------------------------------------------ resuming
def _resume(world, run, capsys, *extra) -> tuple[int, list[str], str]:
    code = main([*_train(world["a"], run, "optim.epochs=2", *extra), "--resume"])
    captured = capsys.readouterr()
    err = captured.err.replace("\r", "\n").splitlines()
    return code, [line for line in err if line.startswith("candle-dist")], captured.out


def _steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("damage", "said", "resumed"),
    [
        (lambda c: shutil.rmtree(c / "step_000000005"), "latest names 'step_000000005', which", 4),
        (lambda c: (c / "latest").unlink(), "latest is missing", 5),
        (
            lambda c: _truncate(c / "step_000000005" / "optimizer.pt"),
            "optimizer.pt has 100 bytes",
            4,
        ),
        (
            lambda c: _truncate(c / "step_000000005" / "trainer.json"),
            "trainer.json is unreadable",
            4,
        ),
    ],
    ids=["latest-names-a-missing-step", "no-latest", "truncated-optimizer", "truncated-trainer"],
)
def test_resume_falls_back_to_the_newest_complete_checkpoint(world, tmp_path, capsys, damage,
                                                             said, resumed):  # fmt: skip
    run = _copy_run(world, tmp_path)
    damage(run / "checkpoints")
    code, lines, out = _resume(world, run, capsys)
    assert code == 0
    assert len(lines) == 1 and said in lines[0], lines
    assert lines[0].endswith(
        f"resuming from the newest complete checkpoint, step_00000000{resumed}"
    )
    assert f"at step {resumed}" in out
    assert _steps(run) == list(range(1, 11))  # the steps after the checkpoint again, once each
    assert (run / "final" / "classifier.pt").exists()


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(100)


def test_a_damaged_newer_checkpoint_does_not_outlive_the_resumed_run(world, tmp_path, capsys):
    """Checkpoints past the resumed step are pruned by the first save: they would otherwise
    outrank (and keep KEEP_LAST from keeping) the new ones."""
    run = _copy_run(world, tmp_path)
    damaged = run / "checkpoints" / "step_000000099"
    shutil.copytree(run / "checkpoints" / "step_000000005", damaged)
    _truncate(damaged / "head.pt")
    (run / "checkpoints" / "latest").write_text(damaged.name)
    code, lines, _ = _resume(world, run, capsys)
    assert code == 0 and "step_000000099: head.pt has 100 bytes" in lines[0]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_000000005", "step_000000010"]
    assert (run / "checkpoints" / "latest").read_text() == "step_000000010"


def test_resume_without_a_usable_checkpoint(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path)
    shutil.rmtree(run / "final")
    _truncate(run / "checkpoints" / "step_000000005" / "head.pt")
    _truncate(run / "checkpoints" / "step_000000004" / "trainer.json")
    code, lines, _ = _resume(world, run, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("candle-dist train: error: --resume: no usable checkpoint in ")
    for phrase in ("step_000000005: head.pt has 100 bytes", "step_000000004: trainer.json",
                   "restore the damaged files, or delete"):  # fmt: skip
        assert phrase in lines[0]
    assert not (run / "final").exists()
    assert len(_steps(run)) == 5  # untouched


def test_resume_with_nothing_to_resume_starts_fresh(world, tmp_path, capsys):
    code, lines, _ = _resume(world, tmp_path / "new", capsys, "optim.epochs=1")
    assert code == 0
    assert lines == [f"candle-dist train: --resume: no checkpoint in {tmp_path}/new/checkpoints "
                     "yet; starting from step 0"]  # fmt: skip


def test_a_fresh_run_does_not_write_over_another(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path)
    assert main(_train(world["a"], run)) == 2
    _one_error(capsys, "train", "already holds a training run", "pass --resume")
    assert _steps(run) == list(range(1, 6))


def test_resume_drops_metrics_past_the_resumed_step(world, tmp_path, capsys):
    """A kill after step 5 was logged but before its checkpoint: records 5 are written again."""
    run = _copy_run(world, tmp_path)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_000000005")
    (run / "checkpoints" / "latest").write_text("step_000000004")
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 6, "lo')  # cut short by the kill
    code, lines, _ = _resume(world, run, capsys)
    assert code == 0 and lines == []
    assert _steps(run) == list(range(1, 11))


def test_a_checkpoint_records_size_and_sha256_of_its_files(world):
    import hashlib

    step = world["run"] / "checkpoints" / "step_000000005"
    files = json.loads((step / "trainer.json").read_text())["files"]
    assert set(files) == {"head.pt", "optimizer.pt", "shard-000-of-001.pt"}
    for name, record in files.items():
        data = (step / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_checkpoints_and_exits_75(world, tmp_path):
    run = tmp_path / "run"
    argv = _train(world["a"], run, "optim.epochs=100000", "train.checkpoint_every=100000")
    process = subprocess.Popen(
        [sys.executable, "-m", "candle_dist.cli", *argv],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 75
    lines = [line for line in err.replace("\r", "\n").splitlines() if "candle-dist" in line]
    assert lines[0].startswith("candle-dist train: Ctrl-C: stopping after this step"), lines
    assert lines[1].startswith("candle-dist train: stopped by SIGINT at step "), lines
    assert lines[1].endswith("; resume with --resume") and len(lines) == 2
    latest = (run / "checkpoints" / "latest").read_text()
    assert f"(checkpoint {run / 'checkpoints' / latest})" in lines[1]
    assert "Traceback" not in err
    assert not (run / "final").exists()


# ------------------------------------------------------------------ output paths, atomicity
@pytest.mark.parametrize("command", ["train", "eval", "demo", "predict"])
def test_output_path_under_a_file_or_a_file_in_its_place(world, tmp_path, capsys, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    final, val = str(world["run"] / "final"), str(world["a"] / "val")
    argv = {
        "train": _train(world["a"], "{out}"),
        "eval": ["eval", "--checkpoint", final, "--features", val, "--output", "{out}"],
        "demo": ["demo", "--output", "{out}"],
        "predict": ["predict", "--checkpoint", final, val, "--output", "{out}"],
    }[command]
    option = "train.output" if command == "train" else "--output"
    under = [a.replace("{out}", str(blocker / "out")) for a in argv]
    assert main(under) == 2
    _one_error(capsys, command, f"{option} {blocker}/out cannot be created", "is a file")
    if command == "predict":  # a file is expected there: a folder in its place
        assert main([a.replace("{out}", str(tmp_path)) for a in argv]) == 2
        _one_error(capsys, command, f"--output {tmp_path} is a folder")
    else:
        assert main([a.replace("{out}", str(blocker)) for a in argv]) == 2
        _one_error(capsys, command, f"{option} {blocker} is an existing file, not a folder")
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.parametrize("command", ["train", "eval", "demo", "predict"])
def test_output_path_without_permission(world, tmp_path, capsys, monkeypatch, command):
    """Root may write anywhere, so the permission check is made to fail."""
    from candle_dist import outputs

    final, val, out = str(world["run"] / "final"), str(world["a"] / "val"), tmp_path / "out"
    argv = {
        "train": _train(world["a"], out),
        "eval": ["eval", "--checkpoint", final, "--features", val, "--output", str(out)],
        "demo": ["demo", "--output", str(out)],
        "predict": ["predict", "--checkpoint", final, val, "--output", str(out)],
    }[command]
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    assert main(argv) == 2
    option = "train.output" if command == "train" else "--output"
    _one_error(capsys, command, f"{option} {out}: no permission to write in {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_predict_leaves_no_partial_file(world, tmp_path, capsys):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.zeros((3, 16), dtype=np.float32))
    bad.write_text("not an array")
    out = tmp_path / "p.jsonl"
    argv = ["predict", "--checkpoint", str(world["run"] / "final"), "--output", str(out)]
    assert main([*argv, str(good), str(bad)]) == 2
    _one_error(capsys, "predict", f"{bad}: not a readable .npy array")
    assert main([*argv, str(good), str(tmp_path / "missing.npy")]) == 2
    _one_error(capsys, "predict", "missing.npy does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "good.npy"]
    assert main([*argv, str(good)]) == 0
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-folder"])
def test_eval_publishes_nothing_when_writing_fails(world, tmp_path, capsys, monkeypatch, existing):
    import candle_dist.eval.plots as plots

    out = tmp_path / "eval"
    if existing:  # a folder of the user's, with an earlier evaluation: kept as it was
        out.mkdir()
        (out / "metrics.json").write_text("earlier")
        (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_text() for p in out.iterdir()} if existing else None

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x.png"))

    monkeypatch.setattr(plots, "plot_shot_groups", disk_full)
    argv = ["eval", "--checkpoint", str(world["run"] / "final"), "--features"]
    assert main([*argv, str(world["a"] / "val"), "--output", str(out)]) == 2
    _one_error(capsys, "eval", "No space left on device")
    if existing:
        assert {p.name: p.read_text() for p in out.iterdir()} == before
    else:
        assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main([*argv, str(world["a"] / "val"), "--output", str(out)]) == 0
    names = {"metrics.json", "per_class_accuracy.png", "shot_groups.png"}
    assert {p.name for p in out.iterdir()} == names | ({"notes.txt"} if existing else set())


def test_train_publishes_no_final_when_the_export_fails(world, tmp_path, capsys, monkeypatch):
    from candle_dist.train import trainer

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "classifier.pt")

    monkeypatch.setattr(trainer, "export_classifier", disk_full)
    run = tmp_path / "run"
    assert main(_train(world["a"], run, "optim.epochs=1")) == 2
    _one_error(capsys, "train", "classifier.pt: No space left on device")
    kept = sorted(p.name for p in run.iterdir())
    assert kept == ["checkpoints", "config.json", "metrics.jsonl", "tracking"]


# ----------------------------------------------------------------------- other subcommands
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--epochs", "0"], "--epochs 0: give a whole number >= 1"),
        (["demo", "--classes", "10", "--new-classes", "10"], "--new-classes 10: leave base"),
        (["demo", "--imbalance-ratio", "-1"], "--imbalance-ratio -1.0: give smallest/largest"),
        (["bench", "head", "--classes", "8", "--num-heads", "0"], "--num-heads must be at least"),
        (["bench", "head", "--classes", "8", "--seed", "-1"], "--seed must be at least 0"),
        (["bench", "head", "--classes", "-3"], "--classes must be at least 1"),
        (["pretrain-tiny", "--seed", "-1"], "--seed -1: give a whole number >= 0"),
        (["pretrain-tiny", "--steps", "0"], "--steps 0: give a whole number >= 1"),
        (["submit", "--local", "--local-ranks", "0"], "--local-ranks 0: give a whole number >= 1"),
        (["submit", "--extract-time", "-5"], "--extract-time -5: give a whole number >= 1"),
        (["submit", "--signal-delay", "-1"], "--signal-delay -1: give a whole number >= 0"),
    ],
)
def test_other_subcommands_refuse_nonsensical_numbers(tmp_path, capsys, argv, message):
    if argv[0] == "demo":
        argv = [*argv, "--output", str(tmp_path / "demo")]
    elif argv[0] == "pretrain-tiny":
        argv = [*argv, "--cache-dir", str(tmp_path / "cache")]
    elif argv[0] == "submit":
        argv = [
            *argv,
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--folder",
            str(tmp_path / "logs"),
        ]
    assert main(argv) == 2
    _one_error(capsys, argv[0], message)
    assert list(tmp_path.iterdir()) == []
