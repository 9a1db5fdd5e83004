"""`candle-dist bench head`: one JSON line with the timing fields; the dense baseline computes the
same loss as the head it is compared with; sampled mode times a class subset."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from candle_dist import cli

FIELDS = {
    "step_s_median": float,
    "step_s_all": list,
    "peak_mem_mb": float,
    "peak_rss_mb": float,
    "classes": int,
    "batch": int,
    "dim": int,
    "world_size": int,
    "device": str,
    "step_gflop": float,
    "first_loss": float,
    "step_classes": int,
}


def test_cli_prints_one_json_line_with_the_fields():
    command = [sys.executable, "-m", "candle_dist.cli", "bench", "head"]
    command += ["--classes", "50", "--batch", "8", "--dim", "32", "--steps", "2", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    for name, kind in FIELDS.items():
        assert isinstance(result[name], kind), (name, result.get(name))
    assert (result["classes"], result["batch"], result["dim"]) == (50, 8, 32)
    assert result["world_size"] == 1 and result["impl"] == "candle"
    assert len(result["step_s_all"]) == 2 and min(result["step_s_all"]) > 0
    assert result["step_s_median"] == pytest.approx(
        statistics.median(result["step_s_all"]), abs=1e-3
    )
    assert result["peak_mem_mb"] > 0


def _bench_json(capsys, *extra: str) -> dict:
    argv = ["bench", "head", "--classes", "37", "--batch", "6", "--dim", "16", "--num-heads", "4"]
    argv += ["--steps", "1", "--warmup", "0", "--attn-dropout", "0", "--json", *extra]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mask", ["none", "in_visual", "in_text", "between_visual_text"])
def test_dense_baseline_computes_the_same_loss(capsys, mask):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = _bench_json(capsys, "--mask", mask)
        dense = _bench_json(capsys, "--mask", mask, "--dense")
    finally:
        torch.set_num_threads(threads)
    assert dense["impl"] == "dense"
    assert ours["first_loss"] == pytest.approx(dense["first_loss"], rel=1e-5)


def test_sampled_mode_times_a_class_subset(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = _bench_json(capsys, "--sampled", "0.1")
    finally:
        torch.set_num_threads(threads)
    assert result["sampled"] == 0.1
    assert 1 <= result["step_classes"] < result["classes"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--sampled", "0"], "must be in (0, 1]"), (["--sampled", "0.5", "--dense"], "drop --dense")],
)
def test_bad_sampled_options_are_refused_with_a_message(capsys, extra, message):
    argv = ["bench", "head", "--classes", "10", "--batch", "4", "--dim", "8", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
