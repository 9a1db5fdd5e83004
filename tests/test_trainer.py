"""Trainer: the method's claims on long-tailed features, exact kill -9 resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from candle_dist.config import load_config
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import evaluate
from candle_dist.model.losses import LOSSES
from candle_dist.train.data import training_data_from_synthetic
from candle_dist.train.trainer import fit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def long_tailed():
    synthetic = make_synthetic_features(
        100, 64, imbalance_ratio=100, max_count=100, num_new=20, val_per_class=10, seed=0
    )
    return synthetic, *training_data_from_synthetic(synthetic)


def _train(tmp_path, data, loss, *extra):
    _, train, val = data
    cfg = load_config(
        None,
        [
            f"loss.name={loss}",
            "optim.epochs=8",
            "optim.lr=0.01",
            "head.num_heads=4",
            f"train.output={tmp_path / loss}",
            "train.checkpoint_every=1000",
            *extra,
        ],
    )
    return fit(cfg, train, val)["eval"]


def test_cla_beats_ce_on_few_shot_and_zero_shot_on_base(tmp_path, long_tailed):
    torch.set_num_threads(2)
    synthetic = long_tailed[0]
    cla = _train(tmp_path, long_tailed, "cla")
    ce = _train(tmp_path, long_tailed, "cross_entropy")
    assert cla["few"] >= ce["few"] + 0.03, (cla["few"], ce["few"])
    assert cla["new"] > 0.2  # 20 new classes: chance is 0.05
    normalize = torch.nn.functional.normalize
    zero_shot = (
        normalize(synthetic.val_features, dim=-1) @ normalize(synthetic.text_features, dim=-1).t()
    )
    text_only = evaluate(zero_shot, synthetic.val_labels, synthetic.counts, 80)
    assert cla["base"] >= text_only["base"] + 0.1, (cla["base"], text_only["base"])
    assert (tmp_path / "cla" / "eval.json").exists()
    assert (tmp_path / "cla" / "final" / "head.pt").exists()


def _run(output, mode, *overrides):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "train_script.py"), str(output), mode, *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _final(output):
    return torch.load(output / "final" / "head.pt", weights_only=True)


def test_kill_minus_nine_then_resume_equals_uninterrupted(tmp_path):
    assert _run(tmp_path / "straight", "fresh").wait(timeout=300) == 0
    victim = _run(tmp_path / "killed", "fresh")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.exists() and int(latest.read_text().split("_")[1]) >= 14:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "final").exists()
    assert _run(tmp_path / "killed", "resume").wait(timeout=300) == 0
    straight, resumed = _final(tmp_path / "straight"), _final(tmp_path / "killed")
    for name, value in straight.items():
        assert torch.allclose(value, resumed[name], rtol=1e-6, atol=1e-7), name


def _losses(output) -> list[float]:
    records = map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def test_bf16_precision_trains_under_autocast_close_to_fp32(tmp_path):
    """train.precision=bf16 is bf16 autocast on any device (the CPU here): the same run's losses
    within bf16 rounding of fp32's, and not identical to them (autocast was on)."""
    runs = {p: _run(tmp_path / p, "fresh", "optim.epochs=2", f"train.precision={p}") for p in
            ("fp32", "bf16")}  # fmt: skip
    assert all(run.wait(timeout=300) == 0 for run in runs.values())
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) > 2
    assert fp32 != bf16
    for step, (want, got) in enumerate(zip(fp32, bf16, strict=True)):
        assert abs(got - want) <= 0.02 * want, (step, got, want)


def test_checkpoints_load_weights_only(tmp_path, long_tailed):
    _train(tmp_path, long_tailed, "cla", "optim.epochs=1", "train.checkpoint_every=5")
    step_dirs = sorted((tmp_path / "cla" / "checkpoints").glob("step_*"))
    assert step_dirs
    for file in step_dirs[-1].glob("*.pt"):
        torch.load(file, weights_only=True)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: setattr(t, "labels", np.where(t.labels == 0, 500, t.labels)), "outside"),
        (lambda t: setattr(t, "counts", t.counts[:-1]), "counts"),
        (
            lambda t: setattr(t, "labels", np.where(t.labels == 3, 4, t.labels)),
            "no training images",
        ),
        (lambda t: t.features.__setitem__((5, 2), np.nan), "NaN"),
        (lambda t: setattr(t, "features", t.features[:, :10]), "dimension"),
    ],
)
def test_bad_training_input_is_a_clear_error(tmp_path, mutate, message):
    synthetic = make_synthetic_features(20, 16, imbalance_ratio=5, max_count=20, num_new=4, seed=1)
    train, _ = training_data_from_synthetic(synthetic)
    train.features = train.features.copy()
    mutate(train)
    cfg = load_config(None, [f"train.output={tmp_path}", "head.num_heads=4"])
    with pytest.raises(UserInputError, match=message):
        fit(cfg, train)


def test_unknown_loss_is_a_clear_error(tmp_path, long_tailed):
    with pytest.raises(UserInputError, match="unknown loss"):
        _train(tmp_path, long_tailed, "hinge")


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_through_the_config(tmp_path, loss):
    """loss.* options reach the loss; a class without images needs count_offset where the
    formula has no value for n = 0."""
    synthetic = make_synthetic_features(20, 16, imbalance_ratio=5, max_count=20, num_new=4, seed=1)
    train, _ = training_data_from_synthetic(synthetic)
    overrides = [f"train.output={tmp_path / 'run'}", "head.num_heads=4", "optim.epochs=1"]
    cfg = load_config(None, [*overrides, f"loss.name={loss}", "loss.count_offset=1"])
    fit(cfg, train)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert records and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    if loss in ("ldam", "lade", "grw", "class_balanced"):
        cfg = load_config(None, [*overrides, f"train.output={tmp_path / 'b'}", f"loss.name={loss}"])
        with pytest.raises(UserInputError, match="count_offset=1"):
            fit(cfg, train)


def test_tensorboard_receives_losses_and_evaluations(tmp_path, long_tailed):
    """train.log_with=[tensorboard] (the default): the event file holds the loss terms, the
    rates and every evaluation, next to metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, long_tailed, "cla", "optim.epochs=2", "train.eval_every_epoch=true")
    reader = EventAccumulator(str(tmp_path / "cla" / "tracking" / "candle_dist"))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    want = {"train/loss", "train/loss0", "train/loss_vt", "train/loss_vv", "train/lr"}
    assert want | {"train/samples_per_s", "eval/top1", "eval/few", "eval/hm"} <= tags
    last = reader.Scalars("train/loss")[-1].step
    assert [e.step for e in reader.Scalars("eval/top1")] == [last // 2, last, last]  # + final
    assert (tmp_path / "cla" / "metrics.jsonl").exists()


def test_no_tracker_and_an_unknown_tracker(tmp_path, long_tailed):
    _train(tmp_path, long_tailed, "cla", "optim.epochs=1", "train.log_with=[]")
    assert not (tmp_path / "cla" / "tracking").exists()
    with pytest.raises(UserInputError, match="unknown tracker 'tensorbored'"):
        _train(tmp_path / "b", long_tailed, "cla", "train.log_with=[tensorbored]")


def test_select_on_keeps_the_best_epoch(tmp_path, long_tailed):
    """train.select_on=few: best/ holds the epoch whose evaluation had the highest few-shot
    accuracy (a classifier and head like final/'s), final/ the last one."""
    _train(
        tmp_path, long_tailed, "cla", "optim.epochs=3", "train.eval_every_epoch=true",
        "train.select_on=few", "optim.lr=0.05",
    )  # fmt: skip
    run = tmp_path / "cla"
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    evaluations = {r["step"]: r["eval"]["few"] for r in records if "eval" in r}
    selected = json.loads((run / "best" / "head_meta.json").read_text())["selected"]
    assert selected["metric"] == "few"
    assert selected["value"] == max(evaluations.values())
    assert evaluations[selected["step"]] == selected["value"]
    assert {p.name for p in (run / "best").iterdir()} == {p.name for p in (run / "final").iterdir()}


def test_select_on_needs_per_epoch_evaluation(tmp_path, long_tailed):
    with pytest.raises(UserInputError, match="needs a validation store"):
        _train(tmp_path, long_tailed, "cla", "train.select_on=top1")
    with pytest.raises(UserInputError, match=r"unknown train\.select_on='loss'"):
        _train(tmp_path, long_tailed, "cla", "train.select_on=loss")


def test_a_diverged_run_stops_before_it_exports(tmp_path):
    synthetic = make_synthetic_features(20, 16, imbalance_ratio=5, max_count=20, num_new=4, seed=1)
    train, val = training_data_from_synthetic(synthetic)
    cfg = load_config(
        None,
        [
            "optim.lr=1e30",
            "optim.warmup_epochs=0",
            "optim.epochs=3",
            "head.num_heads=4",
            f"train.output={tmp_path / 'run'}",
            "train.log_with=[]",
        ],
    )
    with pytest.raises(UserInputError, match=r"training diverged; lower optim.lr \(it is 1e\+30\)"):
        fit(cfg, train, val)
    assert not (tmp_path / "run" / "final").exists()
