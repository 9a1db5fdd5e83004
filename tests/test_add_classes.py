"""`candle-dist add-classes`: classes added by name equal classes declared at training time with
the same raw inputs, change existing columns in every mask mode, recognize new classes on the
demo's data without costing base accuracy, and bad input is one line that writes nothing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.bench_add_classes import demonstrate
from candle_dist.classifier import CLASS_INPUTS, classifier_state, load
from candle_dist.cli import main
from candle_dist.grow import grown_state
from candle_dist.model.fusion import MASK_MODES
from candle_dist.model.head import CandleHead
from candle_dist.provenance import classes_sha256

CLASSES, NEW, SHOTS = 40, 8, 3


def _head(texts: torch.Tensor, protos: torch.Tensor, mask: str) -> CandleHead:
    return CandleHead(
        text_features=texts, visual_prototypes=protos, logit_scale=2.0, mask=mask, num_heads=4
    )


@pytest.mark.parametrize("mask", MASK_MODES)
def test_added_classes_equal_classes_declared_with_the_same_inputs(mask):
    gen = torch.Generator().manual_seed(0)
    c, base, k, d = 12, 9, 5, 16
    texts, protos = torch.randn(c, d, generator=gen), torch.randn(base, d, generator=gen)
    added = torch.randn(k, d, generator=gen)
    old = _head(texts, protos, mask)
    with torch.no_grad():  # trained-looking parameters, so that every term matters
        for p in old.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        old.fusion.ratio.fill_(0.7)
    names = [f"c{i}" for i in range(c + k)]
    before = classifier_state(old, names[:c])
    grown = grown_state(before, names[c:], added, added, [0] * k)

    declared = _head(torch.cat([texts, added]), protos, mask)
    state = {n: v for n, v in old.state_dict().items() if n not in ("text_features",)}
    state["virtual_prototypes"] = torch.cat([old.virtual_prototypes.detach(), added])
    declared.load_state_dict(state, strict=False)
    want = classifier_state(declared, names)
    for name in ("class_keys", "class_values", "text_columns", "proto_columns", *CLASS_INPUTS):
        torch.testing.assert_close(grown[name], want[name], rtol=1e-5, atol=1e-5)
    # every mode lets class tokens see class tokens: existing columns change in all of them
    for name in ("text_columns", "proto_columns"):
        assert (grown[name][:c] - before[name]).abs().max() > 1e-4, (mask, name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demonstration at small size (tiny CLIP, cached by tests/test_demo.py or built)."""
    out = tmp_path_factory.mktemp("grow")
    results = demonstrate(out, CLASSES, NEW, max_per_class=40, epochs=5, shots=SHOTS)
    return out, results


def test_new_classes_are_recognized_and_base_accuracy_holds(demo):
    _, results = demo
    declared = results["A: declared at training"]
    for name in ("B + names", f"B + names + {SHOTS} images"):
        grown = results[name]
        assert grown["new"] > 3 * (1 / NEW), (name, grown)
        assert abs(grown["base"] - declared["base"]) <= 0.02, (name, grown, declared)


def test_output_is_an_export_directory_with_the_classes_appended(demo):
    out, _ = demo
    before, after = load(out / "b" / "final"), load(out / "b_shots")
    new = (out / "new.txt").read_text().splitlines()
    assert after.classnames == [*before.classnames, *new]
    assert after.num_base_classes == before.num_base_classes
    assert after.scores(torch.zeros(3, before.dim)).shape == (3, CLASSES)
    config = json.loads((out / "b_shots" / "config.json").read_text())
    assert config["added_classes"] == [{"name": n, "images": SHOTS} for n in new]
    assert config["num_classes"] == CLASSES
    assert config["provenance"]["classes_sha256"] == classes_sha256(after.classnames)
    assert config["clip"]["model"] == "tiny-clip" and config["clip"]["templates"]
    c = len(before.classnames)
    with_images, by_name = after.state["class_prototypes"], load(out / "b_names").state
    assert not torch.allclose(with_images[c:], by_name["class_prototypes"][c:])
    torch.testing.assert_close(by_name["class_prototypes"][c:], by_name["class_texts"][c:])


def test_a_run_exported_before_raw_inputs_is_rebuilt_from_its_head(demo, tmp_path):
    out, _ = demo
    final = tmp_path / "final"
    shutil.copytree(out / "b" / "final", final)
    state = torch.load(final / "classifier.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in CLASS_INPUTS}, final / "classifier.pt")
    argv = [
        "add-classes",
        str(final),
        "--names",
        str(out / "new.txt"),
        "--output",
        str(tmp_path / "g"),
    ]
    assert main(argv) == 0
    torch.testing.assert_close(
        load(tmp_path / "g").state["text_columns"], load(out / "b_names").state["text_columns"]
    )


@pytest.fixture(scope="module")
def arrays_run(stores, tmp_path_factory):
    """A run trained from a store of arrays: it records no CLIP."""
    out = tmp_path_factory.mktemp("arrays") / "run"
    argv = ["train", f"data.train={stores / 'train'}", f"train.output={out}", "optim.epochs=1"]
    assert main(argv) == 0
    return out / "final"


def _old_export(demo, tmp_path):
    out, _ = demo
    folder = tmp_path / "old"
    assert main(["export", str(out / "b" / "final"), "--output", str(folder)]) == 0
    tensors = load_file(folder / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if k not in CLASS_INPUTS}, folder / "model.safetensors"
    )
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("present", "already in the classifier"),
        ("empty", "is empty"),
        ("no_clip", "does not record the CLIP"),
        ("old_export", "re-export"),
        ("stray_folder", "not a name of --names"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    demo, arrays_run, tmp_path, capsys, case, message
):
    out, _ = demo
    source, names = out / "b" / "final", tmp_path / "names.txt"
    names.write_text("a brand new class\n")
    extra = []
    if case == "present":
        names.write_text(load(source).classnames[0] + "\n")
    elif case == "empty":
        names.write_text("")
    elif case == "no_clip":
        source = arrays_run
    elif case == "old_export":
        source = _old_export(demo, tmp_path)
    else:
        (tmp_path / "shots" / "not a new class").mkdir(parents=True)
        extra = ["--images", str(tmp_path / "shots")]
    capsys.readouterr()
    target = tmp_path / "grown"
    code = main(
        ["add-classes", str(source), "--names", str(names), "--output", str(target), *extra]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not target.exists()
