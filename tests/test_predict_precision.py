"""`candle-dist predict` encodes images under the autocast its training features were extracted
with, so that the classifier scores features like the ones it was trained on."""

import json

import numpy as np
import pytest
import torch

from candle_dist import predict
from candle_dist.cli import main
from candle_dist.features.store import FeatureStore
from tests.data_helpers import jpeg_bytes, tiny_model_config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A head trained on random 32-d features, and three photos for the tiny CLIP to encode."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    FeatureStore.from_arrays(
        root / "train",
        rng.normal(size=(40, 32)).astype(np.float32),
        np.arange(40) % 4,
        None,
        rng.normal(size=(4, 32)).astype(np.float32),
        [f"class {i}" for i in range(4)],
        None,
        4,
    )
    threads = torch.get_num_threads()
    train = ["train", f"data.train={root / 'train'}", f"train.output={root / 'run'}"]
    assert main([*train, "optim.epochs=1", "head.num_heads=4"]) == 0
    torch.set_num_threads(threads)
    images = root / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(rng))
    return {"final": root / "run" / "final", "config": tiny_model_config(root), "images": images}


def _predict(run: dict, monkeypatch, recorded: str | None, *options: str) -> list[str]:
    """Record `recorded` as the checkpoint's extraction precision (None: an old checkpoint),
    predict the photos, and return the precision of each autocast the images were encoded in."""
    meta_file = run["final"] / "head_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["clip"] = {"model": "dataplane-tiny", "pretrained": "none", "dim": 32}
    if recorded is not None:
        meta["clip"]["precision"] = recorded
    meta_file.write_text(json.dumps(meta))
    used = []

    def spy(device: torch.device, precision: str):
        used.append(precision)
        return real(device, precision)

    real = predict.autocast
    monkeypatch.setattr(predict, "autocast", spy)
    argv = ["predict", "--checkpoint", str(run["final"]), str(run["images"])]
    assert main([*argv, "--model-config", str(run["config"]), "--device", "cpu", *options]) == 0
    return used


@pytest.mark.parametrize("recorded", ["bf16", "fp32"])
def test_images_are_encoded_with_the_recorded_precision(run, monkeypatch, recorded, capsys):
    assert _predict(run, monkeypatch, recorded) == [recorded]
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3 and all(len(r["topk"]) == 4 for r in records)


def test_precision_option_overrides_the_recorded_one(run, monkeypatch):
    assert _predict(run, monkeypatch, "bf16", "--precision", "fp32") == ["fp32"]
    assert _predict(run, monkeypatch, "fp32", "--precision", "auto") == ["fp32"]  # on the CPU


def test_old_checkpoint_falls_back_to_the_auto_rule_and_says_so(run, monkeypatch, capsys):
    assert _predict(run, monkeypatch, None) == ["fp32"]  # auto on the CPU
    err = capsys.readouterr().err
    assert "does not record" in err and "fp32" in err and "--precision" in err
