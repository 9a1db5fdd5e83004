"""The public Python API: the names README documents, and README's example, run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = {
    "candle_dist.model": ["CandleHead", "CompensatingLogitAdjustedLoss", "build_loss", "LOSSES"],
    "candle_dist.features": ["FeatureStore", "extract"],
    "candle_dist.classifier": ["load", "ExportedClassifier"],
    "candle_dist.train": ["fit", "Config", "load_config", "training_data_from_store"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_import(package):
    module = __import__(package, fromlist=["*"])
    for name in PUBLIC[package]:
        assert getattr(module, name) is not None, f"{package}.{name}"
    if hasattr(module, "__all__"):
        assert set(PUBLIC[package]) <= set(module.__all__)


def test_a_subcommand_import_does_not_load_the_rest():
    """Lazy exports: `candle-dist train --help` imports the trainer's CLI module only."""
    code = "import sys, candle_dist.train.cli; print('candle_dist.train.trainer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_python_api_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    run = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "top-1" in run.stdout
    assert (tmp_path / "runs" / "api-example" / "final" / "classifier.pt").is_file()
