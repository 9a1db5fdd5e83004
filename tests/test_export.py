"""`candle-dist export`: a directory that loads without the training code, scores as the run's
classifier does (ONNX included), carries a model card, serves predict, and refuses bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from candle_dist.classifier import ExportedClassifier, load
from candle_dist.cli import main
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.features.store import FeatureStore

FILES = {"model.safetensors", "config.json", "classnames.txt", "README.md"}


@pytest.fixture(scope="module")
def run(stores, tmp_path_factory):
    """A finished one-epoch run on the small stores, evaluated on val (RUN/eval.json)."""
    out = tmp_path_factory.mktemp("export") / "run"
    argv = [
        "train",
        f"data.train={stores / 'train'}",
        f"data.val={stores / 'val'}",
        f"train.output={out}",
        "optim.epochs=1",
        "head.num_heads=4",
        "loss.tau=0.5",
    ]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def features(stores):
    return torch.as_tensor(np.asarray(FeatureStore(stores / "val").features[:50], np.float32))


def test_export_scores_like_the_run_in_torch_and_onnxruntime(run, features, tmp_path, capsys):
    import onnxruntime

    out = tmp_path / "export"
    argv = ["export", str(run / "final"), "--output", str(out), "--format", "safetensors,onnx"]
    assert main(argv) == 0
    assert "max |diff|" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {*FILES, "model.onnx"}
    original = ExportedClassifier.load(run / "final" / "classifier.pt")
    exported = load(out)
    assert exported.classnames == original.classnames
    assert exported.provenance == original.provenance
    assert torch.equal(exported.scores(features), original.scores(features))
    assert torch.equal(exported.scores(features, "new"), original.scores(features, "new"))

    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (scores,) = session.run(None, {"image_features": features.numpy()})
    assert scores.shape == (len(features), len(original.classnames))
    assert np.abs(scores - original.scores(features).numpy()).max() <= 1e-4

    config = json.loads((out / "config.json").read_text())
    meta = json.loads((run / "final" / "head_meta.json").read_text())
    assert config["num_classes"] == 30 and config["num_base_classes"] == 24
    assert config["clip"]["model"] == meta["clip"]["model"] == "arrays"
    assert config["provenance"] == meta["provenance"]
    card = (out / "README.md").read_text()
    top1 = json.loads((run / "eval.json").read_text())["top1"]
    assert "Classes: 30 (24 base" in card and "Mask mode: `none`" in card
    assert f"| top1 | {top1:.4f} |" in card and "`cla` (tau=0.5)" in card
    assert "imbalance ratio (max / min) 10.0" in card and "Not a real-world model" in card


def test_export_loads_without_the_training_code_and_predict_uses_it(run, stores, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run / "final"), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == FILES
    blocked = "; ".join(
        f"sys.modules[{m!r}] = None"
        for m in ("candle_dist.model", "candle_dist.train", "candle_dist.features", "open_clip")
    )
    code = f"import sys; {blocked}; import torch, candle_dist.classifier as c; "
    code += f"print(c.load({str(out)!r}).scores(torch.zeros(2, 32)).shape)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "torch.Size([2, 30])", done.stderr[-2000:]

    predictions = {}
    for name, checkpoint in (("run", run / "final"), ("export", out)):
        file = tmp_path / f"{name}.jsonl"
        argv = ["predict", "--checkpoint", str(checkpoint), "--output", str(file)]
        assert main([*argv, "--top-k", "3", str(stores / "val")]) == 0
        predictions[name] = [json.loads(line) for line in file.read_text().splitlines()]
    assert predictions["export"] == predictions["run"] and len(predictions["run"]) == 300

    # an earlier export is replaced whole; a folder holding other files is refused
    onnx = ["--format", "onnx"]
    assert main(["export", str(run / "final"), "--output", str(out), *onnx]) == 0
    assert main(["export", str(run / "final"), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == FILES
    capsys.readouterr()
    assert main(["export", str(run / "final"), "--output", str(run / "final")]) == 2
    assert "holding other files" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_clip_run(tmp_path_factory):
    """A one-epoch run on a store whose manifest records the tiny CLIP with random weights."""
    from candle_dist.features.clip_loading import PACKAGE_CONFIGS

    root = tmp_path_factory.mktemp("tower")
    s = make_synthetic_features(8, 128, imbalance_ratio=2, max_count=10, num_new=2, seed=3)
    FeatureStore.from_arrays(
        root / "train",
        s.train_features.numpy(),
        s.train_labels.numpy(),
        None,
        text_features=s.text_features.numpy(),
        classnames=s.classnames,
        counts=s.counts.numpy(),
        num_base_classes=s.num_base_classes,
        model="tiny-clip",
        pretrained="none",
        model_config=str(PACKAGE_CONFIGS / "tiny-clip.json"),
    )
    argv = ["train", f"data.train={root / 'train'}", f"train.output={root / 'run'}"]
    assert main([*argv, "optim.epochs=1", "head.num_heads=4"]) == 0
    return root / "run"


def test_export_with_image_tower_scores_images_like_clip_and_the_classifier(
    tiny_clip_run, tmp_path, capsys
):
    import onnxruntime

    from candle_dist.features.clip_loading import load_clip
    from candle_dist.features.transforms import PreprocessSpec

    out = tmp_path / "export"
    argv = ["export", str(tiny_clip_run / "final"), "--output", str(out), "--format", "onnx"]
    assert main([*argv, "--with-image-tower"]) == 0
    assert "model_with_image_tower.onnx: onnxruntime vs torch" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {*FILES, "model.onnx", "model_with_image_tower.onnx"}
    config = json.loads((out / "config.json").read_text())
    clip = config["clip"]
    model = load_clip(clip["model"], clip["pretrained"], clip["model_config"])[0]
    spec = PreprocessSpec.from_model(model)
    assert config["onnx_image_tower"] == {
        "file": "model_with_image_tower.onnx",
        "image_size": 64,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    with torch.no_grad():
        want = load(out).scores(model.encode_image((images - mean) / std)).numpy()
    session = onnxruntime.InferenceSession(str(out / "model_with_image_tower.onnx"))
    (got,) = session.run(None, {"images": images.numpy()})
    assert got.shape == (2, 8)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "classifier.pt does not exist: CHECKPOINT must be the final/ directory"),
        ("format", "--format safetensors,tflite: unknown format 'tflite'; choose from"),
        ("file", "is an existing file, not a folder"),
        ("no_onnxruntime", 'needs onnxruntime: pip install "candle_dist[export]"'),
        ("onnx_mismatch", "model.onnx: onnxruntime's scores differ from torch's (max |diff|"),
        ("tower_without_onnx", "--with-image-tower needs --format onnx (got --format safetensors)"),
        ("tower_from_arrays", "--with-image-tower: the run does not record the CLIP that made"),
        ("tower_weights", "CLIP weights 'openai' (model ViT-B-32) are not a local file: the w"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    run, tmp_path, case, message, capsys, monkeypatch
):
    import importlib.util

    out = tmp_path / "export"
    checkpoint = tmp_path / "missing" if case == "missing" else run / "final"
    argv = ["export", str(checkpoint), "--output", str(out)]
    if case == "format":
        argv += ["--format", "safetensors,tflite"]
    if case == "file":
        out.write_text("mine")
    if case == "no_onnxruntime":
        argv += ["--format", "onnx"]
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name: None if name == "onnxruntime" else find_spec(name),
        )
    if case == "onnx_mismatch":
        argv += ["--format", "onnx"]
        monkeypatch.setattr("candle_dist.export.onnx_tolerance", lambda *args: -1.0)
    if case == "tower_without_onnx":
        argv += ["--with-image-tower"]
    if case in ("tower_from_arrays", "tower_weights"):
        argv += ["--format", "onnx", "--with-image-tower"]
    if case == "tower_weights":
        recorded = {"model": "ViT-B-32", "pretrained": "openai", "model_config": None}
        monkeypatch.setattr("candle_dist.export.clip_record", lambda *args: recorded)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("candle-dist export: error: "), err
    assert message in err[0]
    assert [p.name for p in tmp_path.iterdir() if p.name != "missing"] == (
        ["export"] if case == "file" else []
    )
    if case == "file":
        assert out.read_text() == "mine"
