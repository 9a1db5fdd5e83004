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


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "classifier.pt does not exist: CHECKPOINT must be the final/ directory"),
        ("format", "--format safetensors,tflite: unknown format 'tflite'; choose from"),
        ("file", "is an existing file, not a folder"),
        ("no_onnxruntime", 'needs onnxruntime: pip install "candle_dist[export]"'),
        ("onnx_mismatch", "model.onnx: onnxruntime's scores differ from torch's (max |diff|"),
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
