"""Dataset configs load with the schema, and their class lists are the published ones."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from candle_dist.config import load_config
from candle_dist.data.shards import read_classnames
from candle_dist.errors import UserInputError
from candle_dist.features.prompts import check_templates

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DATA = ROOT / "configs" / "data"
# the datasets' published files (scripts/prepare_classnames.py --source-dir), where a
# maintainer has them: CANDLE_DIST_SOURCE_DIR=DOWNLOADS checks the committed lists against them
SOURCES = Path(os.environ.get("CANDLE_DIST_SOURCE_DIR", "/nonexistent"))
CLASSES = {"inat2018": 8142, "imagenet_lt": 1000, "places_lt": 365}


def test_every_dataset_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"inat2018", "inat2021", "imagenet_lt", "places_lt", "demo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_names_everything_a_run_needs(path):
    cfg = load_config(path)
    assert cfg.data.train_shards and cfg.data.val_shards
    assert cfg.data.train and cfg.data.val
    assert cfg.clip.name and cfg.clip.pretrained
    check_templates(cfg.clip.templates)
    assert cfg.optim.batch_size > 0 and cfg.optim.epochs > 0
    if cfg.data.classnames:
        names = read_classnames(ROOT / cfg.data.classnames)
        assert len(names) == CLASSES[path.stem]
    assert cfg.train.output.startswith("runs/")


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(UserInputError, match=r"unknown key\(s\) colour .*valid keys: name"):
        load_config(ROOT / "configs" / "inat2018.yaml", ["clip.colour=red"])


def test_class_lists_match_their_recorded_sources():
    sources = json.loads((DATA / "sources.json").read_text())
    assert set(sources) == {p.name for p in DATA.iterdir() if p.name != "sources.json"}
    for name, record in sources.items():
        data = (DATA / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"], name
        assert data.count(b"\n") == record["lines"]
        source = SOURCES / record["source"]
        if source.is_file():
            assert hashlib.sha256(source.read_bytes()).hexdigest() == record["source_sha256"]


@pytest.mark.skipif(not SOURCES.is_dir(), reason="set CANDLE_DIST_SOURCE_DIR to the sources")
def test_prepare_classnames_reproduces_the_committed_files(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "prepare_classnames.py"),
            "--source-dir",
            SOURCES,
            "--output-dir",
            tmp_path,
        ],
        check=True,
        capture_output=True,
    )
    for path in DATA.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    categories = json.loads((SOURCES / "inat2018_categories.json").read_text())
    names = read_classnames(DATA / "inat2018_classnames.txt")
    assert names == [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
