"""eval options: taxonomy-aware metrics (--class-info) and post-hoc logit adjustment (--adjust)."""

import json

import numpy as np
import pytest

from candle_dist.cli import main
from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import MetricAccumulator
from candle_dist.eval.taxonomy import read_taxonomy, taxonomy_metrics

# species 0, 1 share a genus; 2 is another genus of the same family; 3 another family, same order
TSV = (
    "id\tname\tgenus\tfamily\torder\n"
    "0\ta\tG1\tF1\tO1\n1\tb\tG1\tF1\tO1\n2\tc\tG2\tF1\tO1\n3\td\tG3\tF2\tO1\n"
)


def _taxonomy(tmp_path, text=TSV, classes=4):
    path = tmp_path / "taxonomy.tsv"
    path.write_text(text)
    return read_taxonomy(path, classes)


def test_levels_and_group_codes(tmp_path):
    levels, codes = _taxonomy(tmp_path)
    assert levels == ["genus", "family", "order"]
    assert codes.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_top1_per_level_and_mean_distance_by_hand(tmp_path):
    levels, codes = _taxonomy(tmp_path)
    # 10 images: 4 right; mistakes 0->1 (same genus) x3, 0->2 (same family) x2, 2->3 (order) x1
    mistakes = {(0, 1): 3, (0, 2): 2, (2, 3): 1}
    result = taxonomy_metrics(levels, codes, 4, 10, mistakes)
    assert result["top1"] == {"genus": 0.7, "family": 0.9, "order": 1.0}
    assert result["mean_distance"] == pytest.approx((3 * 1 + 2 * 2 + 1 * 3) / 6)


def test_unrelated_classes_are_one_level_beyond_the_last(tmp_path):
    text = "id\tname\tgenus\n0\ta\tG1\n1\tb\tG2\n"
    levels, codes = _taxonomy(tmp_path, text, 2)
    result = taxonomy_metrics(levels, codes, 0, 2, {(0, 1): 2})
    assert result == {"levels": ["genus"], "top1": {"genus": 0.0}, "mean_distance": 2.0}


def test_from_the_accumulators_mistakes_equals_dense_counting(tmp_path):
    levels, codes = _taxonomy(tmp_path)
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(200, 4)), rng.integers(0, 4, 200)
    acc = MetricAccumulator(np.array([50, 20, 5, 0]), 3)
    for start in range(0, 200, 33):
        acc.update(scores[start : start + 33], labels[start : start + 33])
    mistakes = acc.mistakes()
    predicted = scores.argmax(1)
    correct = int((predicted == labels).sum())
    result = taxonomy_metrics(levels, codes, correct, 200, mistakes)
    for index, level in enumerate(levels):
        want = float((codes[index][predicted] == codes[index][labels]).mean())
        assert result["top1"][level] == pytest.approx(want)


def test_a_table_without_levels_or_of_another_size_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match="no taxonomy columns"):
        _taxonomy(tmp_path, "id\tname\n0\ta\n", 1)
    with pytest.raises(UserInputError, match="3 rows but 4 classes"):
        _taxonomy(tmp_path, "id\tname\tgenus\n0\ta\tG\n1\tb\tG\n2\tc\tG\n", 4)


def test_eval_reports_the_taxonomy(stores, tmp_path, capsys):
    run = tmp_path / "run"
    train = ["train", f"data.train={stores / 'train'}", f"train.output={run}", "optim.epochs=1"]
    assert main([*train, "head.num_heads=4"]) == 0
    names = (stores / "train" / "classnames.txt").read_text().splitlines()
    rows = [f"{i}\t{n}\tG{i // 2}\tF{i // 6}" for i, n in enumerate(names)]
    (tmp_path / "tax.tsv").write_text("id\tname\tgenus\tfamily\n" + "\n".join(rows) + "\n")
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(run / "final"), "--features", str(stores / "val")]
    assert main([*argv, "--output", str(out), "--class-info", str(tmp_path / "tax.tsv")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    top1 = metrics["taxonomy"]["top1"]
    assert metrics["top1"] <= top1["genus"] <= top1["family"] <= 1.0
    assert "mean taxonomic distance of mistakes" in capsys.readouterr().out


def test_eval_posthoc_logit_adjustment(stores, tmp_path, capsys):
    """--adjust logit=TAU subtracts TAU log prior: 0 changes nothing; a large TAU moves
    predictions towards rare classes; other adjustments are refused with the reason."""
    run = tmp_path / "run"
    train = ["train", f"data.train={stores / 'train'}", f"train.output={run}", "optim.epochs=1"]
    assert main([*train, "head.num_heads=4", "loss.name=cross_entropy"]) == 0
    argv = ["eval", "--checkpoint", str(run / "final"), "--features", str(stores / "val")]
    results = {}
    for adjust in (None, "logit=0", "logit=3"):
        out = tmp_path / f"eval-{adjust}"
        extra = [] if adjust is None else ["--adjust", adjust]
        assert main([*argv, "--output", str(out), *extra]) == 0
        results[adjust] = json.loads((out / "metrics.json").read_text())
    assert results["logit=0"]["top1"] == results[None]["top1"]
    assert results["logit=3"]["adjust"] == "logit=3"
    counts = np.array([row["train_count"] for row in results[None]["per_class_detail"]])

    def mean_count_of_predictions(metrics):
        predicted = np.array([row["predicted"] for row in metrics["per_class_detail"]])
        return (predicted * counts).sum() / predicted.sum()

    assert mean_count_of_predictions(results["logit=3"]) < mean_count_of_predictions(results[None])
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "x"), "--adjust", "tau_norm=1"]) == 2
    assert "logit=TAU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
