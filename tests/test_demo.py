"""The demo at reduced size shows what the method claims; predict recognizes known images;
each subcommand answers bad input with one error line."""

import json

import numpy as np
import pytest

from candle_dist.cli import main
from candle_dist.data.synthetic_images import render, synthetic_classes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # the default demo (~35 s once the tiny CLIP is cached; building it takes ~3 minutes)
    argv = ["demo", "--output", str(out)]
    assert main(argv) == 0
    return out


def test_demo_shows_the_method_claims(demo):
    m = json.loads((demo / "metrics.json").read_text())
    assert m["num_new_classes"] == 20
    assert set(m) >= {"zero_shot", "linear_ce", "candle_ce", "candle_cla"}
    assert m["candle_cla"]["few"] >= m["candle_ce"]["few"]
    assert m["candle_cla"]["base"] > m["zero_shot"]["base"]
    assert m["candle_cla"]["new"] >= 0.5  # chance among the 20 new classes: 1/20
    for name in ("per_class_accuracy.png", "shot_groups.png", "loss.png", "compare.png"):
        assert (demo / name).stat().st_size > 1000
    compared = json.loads((demo / "compare.json").read_text())["methods"]
    assert list(compared) == ["zero_shot", "linear_ce", "candle_ce", "candle_cla"]
    assert compared["candle_cla"]["top1"] == m["candle_cla"]["top1"]


def test_predict_recognizes_known_images(demo, tmp_path):
    names = (demo / "shards" / "classnames.txt").read_text().splitlines()
    by_name = {c.name: c for c in synthetic_classes(100, seed=0)}
    rng = np.random.default_rng(123)
    truth = {}
    for class_id in range(0, 80, 8):  # base classes
        for k in range(2):
            path = tmp_path / f"c{class_id}_{k}.jpg"
            render(by_name[names[class_id]], rng).save(path, quality=90)
            truth[str(path)] = names[class_id]
    out = tmp_path / "pred.jsonl"
    final = demo / "candle_cla" / "seed-0" / "final"
    assert main(["predict", "--checkpoint", str(final), str(tmp_path), "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(truth)
    top1 = np.mean([r["topk"][0]["class"] == truth[r["input"]] for r in records])
    assert top1 >= 0.6, top1


EXTRACT = ["extract", "--output", "{tmp}/f", "--pretrained", "none"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["make-shards", "--from-folder", "/nonexistent", "--output", "{tmp}/s"], "nonexistent"),
        ([*EXTRACT, "--shards", "{tmp}/none-{{000000..000001}}.tar"], ""),
        ([*EXTRACT, "--shards", "{tmp}/lone/train-000000.tar"], "class"),
        (["eval", "--checkpoint", "{tmp}", "--features", "{tmp}"], "final/"),
        (["predict", "--checkpoint", "{tmp}", "x.jpg"], "final/"),
        (["train", "--config", "{tmp}/missing.yaml"], "does not exist"),
    ],
)
def test_bad_input_to_each_subcommand_is_one_error_line(demo, tmp_path, capsys, argv, message):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "train-000000.tar").write_bytes((demo / "shards" / "train-000000.tar").read_bytes())
    capsys.readouterr()
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "error" in err[0] and message in err[0], err
