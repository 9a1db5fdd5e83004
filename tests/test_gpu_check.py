"""benchmarks/gpu_check.sh without a GPU: clean skips, its CPU test mode, a GPU run's report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DRIVER = ROOT / "benchmarks" / "gpu_check.py"
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


def _run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(
        os.environ,
        PYTHON=sys.executable,
        CUDA_VISIBLE_DEVICES="",  # no CUDA device, also on a machine with one
        GPU_CHECK_JSON=str(tmp_path / "gpu_check.json"),
        GPU_CHECK_LOGS=str(tmp_path / "logs"),
        **env,
    )
    return subprocess.run(
        ["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=540
    )


def test_without_cuda_every_step_is_skipped_and_nothing_is_written(tmp_path):
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    done = _run_script(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("tests", "head", "extract"):
        assert f"SKIPPED {step}: {NO_CUDA}" in done.stdout
    assert "no markdown written (no figures)" in done.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is True and result["failed"] == [] and result["markdown"] is None
    assert result["machine"]["cuda_available"] is False
    assert {name: r["status"] for name, r in result["steps"].items()} == dict.fromkeys(
        ("tests", "head", "extract"), "skipped"
    )
    assert all(r["reason"] == NO_CUDA for r in result["steps"].values())
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before


def test_help_names_the_test_mode():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "GPU_CHECK_DEVICE" in done.stdout and "test mode" in done.stdout


@pytest.mark.slow
def test_cpu_test_mode_runs_every_step(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\n\nkept\n")
    done = _run_script(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_MARKDOWN=str(markdown))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = result["steps"]
    assert result["ok"] and all(r["status"] == "ok" for r in steps.values()), steps
    assert steps["tests"]["passed"] == 2 and steps["tests"]["failed"] == 0
    runs = steps["head"]["runs"]
    assert [(r["impl"], r["classes"]) for r in runs] == [
        ("candle", 40), ("dense", 40), ("candle", 60), ("dense", 60),
    ]  # fmt: skip
    assert all(r["step_s_median"] > 0 and r["dtype"] == "bf16" for r in runs)
    assert steps["extract"]["images"] == steps["extract"]["shards"] * 4
    assert steps["extract"]["images_per_s"] > 0 and steps["extract"]["encoder_images_per_s"] > 0
    text = markdown.read_text()
    assert text.count("<!-- bench:gpu -->") == 1 and "old" not in text and text.endswith("kept\n")
    assert "| candle | 60 | 16 |" in text and "CPU test mode" in text
    assert (tmp_path / "logs" / "tests.log").exists() and (tmp_path / "logs" / "head.log").exists()


def _record(work: Path, name: str, rc: int, limit: int, **record) -> None:
    (work / f"{name}.json").write_text(json.dumps(record))
    (work / f"{name}.rc").write_text(f"{rc} {limit}\n")


def test_report_of_a_gpu_run_names_the_card_and_every_failure(tmp_path):
    """The report step on records as a GPU run leaves them: the markdown path CUDA would take."""
    work = tmp_path / "work"
    work.mkdir()
    card = dict(gpu="NVIDIA H200", capability="9.0", memory_gib=139.8, multiprocessors=132)
    card.update(driver="580.159.03", cuda="13.0", cudnn=91000, torch="2.11.0+cu130")
    _record(work, "machine", 0, 30, status="ok", reason=None, cuda_available=True, **card)
    _record(work, "tests", 124, 170, status="failed", reason="interrupted")
    bench = dict(step_s_median=0.05, peak_mem_mb=2048.0, step_gflop=622.0, gflops=12440.0)
    runs = [
        dict(impl="candle", classes=8142, batch=256, **bench),
        dict(impl="dense", classes=8142, batch=256, error="CUDA out of memory"),
    ]
    _record(work, "head", 0, 140, status="ok", reason=None, runs=runs)
    _record(work, "extract", 1, 80, status="failed", reason="RuntimeError: no shm")
    markdown = tmp_path / "BENCHMARKS.md"
    command = [sys.executable, str(DRIVER), "report", "--work", str(work), "--device", "cuda"]
    command += ["--json", str(tmp_path / "gpu_check.json"), "--markdown", str(markdown)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["failed"] == ["tests", "extract"]
    assert result["steps"]["tests"]["reason"] == "killed at its limit of 170 s"
    text = markdown.read_text()
    assert "NVIDIA H200, compute capability 9.0, 139.8 GiB" in text
    assert "driver 580.159.03, CUDA 13.0" in text and "torch 2.11.0+cu130" in text
    assert "| dense | 8,142 | 256 | CUDA out of memory |" in text
    assert "| candle | 8,142 | 256 | 0.0500 | 2.00 | 622 | 12.4 |" in text
    assert "killed at its limit of 170 s" in text and "RuntimeError: no shm" in text
