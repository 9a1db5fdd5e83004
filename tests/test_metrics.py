"""Long-tailed metrics against hand-computed examples and dense references; chunked = one-shot;
O(C) state; JSON; plots render."""

import json
import math

import numpy as np
import pytest
import torch

from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import (
    MetricAccumulator,
    evaluate,
    harmonic_mean,
    per_class_accuracy,
    shot_groups,
    to_json,
    topk_accuracy,
)
from candle_dist.eval.plots import plot_loss_curve, plot_per_class_accuracy, plot_shot_groups

# Four classes: 0 many (150 images), 1 medium (50), 2 few (5), 3 new (0); num_base = 3.
COUNTS = [150, 50, 5, 0]
SCORES = torch.tensor(
    [
        # label 0: argmax 0 (right); base columns -> 0 (right)
        [0.9, 0.1, 0.0, 0.2],
        # label 0: argmax 3 (wrong); base columns -> 0 (right); rank of 0 is 2
        [0.5, 0.1, 0.0, 0.7],
        # label 1: argmax 0 (wrong); base columns -> 0 (wrong); rank of 1 is 3
        [0.9, 0.1, 0.5, 0.0],
        # label 2: argmax 2 (right)
        [0.1, 0.2, 0.8, 0.3],
        # label 3: argmax 0 (wrong); new column (only 3) -> 3 (right)
        [0.8, 0.1, 0.2, 0.4],
        # label 3: argmax 3 (right)
        [0.1, 0.2, 0.3, 0.9],
    ]
)
LABELS = torch.tensor([0, 0, 1, 2, 3, 3])


def test_topk_accuracy_by_hand():
    assert topk_accuracy(SCORES, LABELS, ks=(1, 2, 3)) == {
        "top1": 3 / 6,
        "top2": 5 / 6,
        "top3": 1.0,
    }
    # k larger than the number of classes counts every row.
    assert topk_accuracy(SCORES, LABELS) == {"top1": 3 / 6, "top5": 1.0}
    assert topk_accuracy(SCORES.numpy(), LABELS.numpy(), ks=(2,)) == {"top2": 5 / 6}


def test_ties_go_to_the_lowest_class_id():
    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert topk_accuracy(scores, torch.tensor([0, 1]), ks=(1,)) == {"top1": 0.5}


def test_per_class_accuracy_with_nan_for_absent_classes():
    accuracy = per_class_accuracy([0, 1, 1, 2, 0], [0, 1, 0, 2, 0], num_classes=4)
    np.testing.assert_array_equal(accuracy[:3], [2 / 3, 1.0, 1.0])
    assert math.isnan(accuracy[3])


def test_shot_group_boundaries():
    counts = [0, 1, 19, 20, 21, 99, 100, 101, 5000]
    groups = shot_groups(counts)
    assert groups["many"].tolist() == [7, 8]
    assert groups["medium"].tolist() == [3, 4, 5, 6]
    assert groups["few"].tolist() == [0, 1, 2]
    assert groups["new"].tolist() == [0]


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.25) == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert harmonic_mean(0.0, 0.9) == 0.0
    assert harmonic_mean(0.7, None) is None


def test_evaluate_by_hand():
    metrics = evaluate(SCORES, LABELS, COUNTS, num_base_classes=3)
    base, new = 3 / 4, 2 / 2  # base rows on base columns: 0, 0, 0(wrong), 2
    assert metrics["top1"] == 3 / 6
    assert metrics["top5"] == 1.0
    assert metrics["all"] == 3 / 6
    assert metrics["many"] == 1 / 2
    assert metrics["medium"] == 0.0
    assert metrics["few"] == 2 / 3  # class 2 (1 of 1) and new class 3 (1 of 2)
    assert metrics["base"] == base
    assert metrics["new"] == new
    assert metrics["hm"] == pytest.approx(2 * base * new / (base + new))
    assert metrics["per_class"] == [0.5, 0.0, 1.0, 0.5]
    assert metrics["num_samples"] == {
        "all": 6,
        "many": 2,
        "medium": 1,
        "few": 3,
        "base": 4,
        "new": 2,
    }
    assert metrics["num_classes"] == {
        "all": 4,
        "many": 1,
        "medium": 1,
        "few": 2,
        "base": 3,
        "new": 1,
    }


def test_groups_without_samples_are_none_and_json_null(tmp_path):
    # No sample of class 1 (medium) and no new classes at all.
    scores, labels = SCORES[[0, 1, 3]][:, :3], LABELS[[0, 1, 3]]
    metrics = evaluate(scores, labels, COUNTS[:3], num_base_classes=3)
    assert metrics["medium"] is None
    assert metrics["new"] is None and metrics["hm"] is None
    assert metrics["per_class"][1] is None
    path = tmp_path / "out" / "metrics.json"
    to_json({**metrics, "extra": float("nan"), "arr": np.array([1.5, np.nan])}, path)
    text = path.read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["medium"] is None and loaded["extra"] is None
    assert loaded["arr"] == [1.5, None]
    assert loaded["base"] == metrics["base"]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_chunked_accumulation_equals_one_shot():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([500, 300, 120, 101, 100, 60, 20, 19, 7, 1, 0, 0, 0])
    num_classes, num_base = len(counts), 10
    labels = torch.randint(0, num_classes, (257,), generator=gen)
    scores = torch.randn(257, num_classes, generator=gen) + 1.5 * torch.nn.functional.one_hot(
        labels, num_classes
    )
    whole = evaluate(scores, labels, counts, num_base)
    accumulator = MetricAccumulator(counts.numpy(), num_base)
    for start in range(0, 257, 50):  # uneven last chunk; numpy chunks mixed with torch ones
        chunk = slice(start, start + 50)
        if start % 100:
            accumulator.update(scores[chunk].numpy(), labels[chunk].numpy())
        else:
            accumulator.update(scores[chunk], labels[chunk])
    chunked = accumulator.compute()
    assert chunked.pop("eval_loss") == pytest.approx(whole.pop("eval_loss"), rel=1e-12)
    assert chunked == whole
    # and one-shot agrees with the simple per-function definitions
    assert whole["top1"] == topk_accuracy(scores, labels, ks=(1,))["top1"]
    per_class = per_class_accuracy(scores.argmax(1), labels, num_classes)
    expected = [None if math.isnan(a) else a for a in per_class.tolist()]
    assert whole["per_class"] == pytest.approx(expected)
    base_rows = labels < num_base
    base_hits = scores[base_rows][:, :num_base].argmax(1) == labels[base_rows]
    assert whole["base"] == pytest.approx(base_hits.double().mean().item())
    new_rows = ~base_rows
    new_hits = scores[new_rows][:, num_base:].argmax(1) + num_base == labels[new_rows]
    assert whole["new"] == pytest.approx(new_hits.double().mean().item())
    assert 0 < whole["base"] < 1 and 0 < whole["new"] < 1


def test_empty_chunks_change_nothing():
    accumulator = MetricAccumulator(COUNTS, 3)
    accumulator.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert accumulator.compute()["top1"] is None
    accumulator.update(SCORES, LABELS)
    accumulator.update(SCORES[:0], LABELS[:0])
    assert accumulator.compute() == evaluate(SCORES, LABELS, COUNTS, 3)


def _long_tailed_case(seed: int = 0, num_rows: int = 600):
    """Scores [N, 60] and labels with a long-tailed label distribution: 50 base classes with
    300 .. 6 training images, 10 new; classes 45..49, 55..59 and some rare others have no
    validation samples; classes 3 and 12 are never predicted (they have samples at seed 0)."""
    gen = torch.Generator().manual_seed(seed)
    num_classes, num_base = 60, 50
    counts = torch.zeros(num_classes, dtype=torch.long)
    counts[:num_base] = (300 * 0.02 ** (torch.arange(num_base) / (num_base - 1))).long().clamp(1)
    prior = 1.0 / (torch.arange(num_classes) + 1.0) ** 1.1
    prior[45:50] = prior[55:] = 0
    labels = torch.multinomial(prior, num_rows, replacement=True, generator=gen)
    onehot = torch.nn.functional.one_hot(labels, num_classes)
    scores = 3 * torch.randn(num_rows, num_classes, generator=gen) + 4.0 * onehot
    scores = scores + 0.05 * counts.clamp(max=40)  # head classes take some tail samples
    scores[:, [3, 12]] = -30.0
    return scores, labels, counts, num_base


def _dense_reference(scores, labels, num_classes):
    """Metrics by their textbook definitions from a dense confusion matrix (small C only);
    macro means as sklearn's average="macro", labels=present classes, zero_division=0."""
    y, pred = labels.numpy(), scores.argmax(1).numpy()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    tp, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    precision = np.array([tp[c] / predicted[c] if predicted[c] else 0.0 for c in range(len(tp))])
    recall = np.array([tp[c] / support[c] if support[c] else 0.0 for c in range(len(tp))])
    f1 = np.array(
        [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    )
    present = np.unique(y)
    mistakes = confusion - np.diag(tp)
    pairs = sorted(
        ((int(mistakes[t, p]), t, p) for t, p in zip(*np.nonzero(mistakes), strict=True)),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    log_probs = torch.log_softmax(scores.double(), dim=1)
    return {
        "tp": tp,
        "support": support,
        "predicted": predicted,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "balanced_accuracy": recall[present].mean(),
        "macro_precision": precision[present].mean(),
        "macro_recall": recall[present].mean(),
        "macro_f1": f1[present].mean(),
        "eval_loss": -log_probs[torch.arange(len(labels)), labels].mean().item(),
        "pairs": [{"true": t, "predicted": p, "count": n} for n, t, p in pairs],
    }


def test_macro_metrics_loss_and_pairs_match_a_dense_reference():
    scores, labels, counts, num_base = _long_tailed_case()
    names = [f"class {c}" for c in range(len(counts))]
    metrics = evaluate(scores, labels, counts, num_base, classnames=names)
    ref = _dense_reference(scores, labels, len(counts))
    # the case covers what the conventions are about
    assert (ref["support"] == 0).sum() >= 10 and ref["predicted"][[3, 12]].tolist() == [0, 0]
    assert ref["support"][[3, 12]].min() > 0 and (ref["predicted"][ref["support"] == 0] > 0).any()
    for key in ("balanced_accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert metrics[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0 < metrics["macro_f1"] < metrics["balanced_accuracy"] < metrics["top1"] < 1
    assert metrics["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)
    assert [
        {k: p[k] for k in ("true", "predicted", "count")} for p in metrics["confused_pairs"]
    ] == (ref["pairs"][:20])
    assert all(
        (p["true_name"], p["predicted_name"]) == (names[p["true"]], names[p["predicted"]])
        for p in metrics["confused_pairs"]
    )
    detail = metrics["per_class_detail"]
    assert [d["name"] for d in detail] == names and [d["id"] for d in detail] == list(range(60))
    assert [d["train_count"] for d in detail] == counts.tolist()
    for key, ref_key in (("support", "support"), ("predicted", "predicted"), ("correct", "tp")):
        assert [d[key] for d in detail] == ref[ref_key].tolist(), key
    for c, d in enumerate(detail):
        assert d["recall"] == (pytest.approx(ref["recall"][c]) if ref["support"][c] else None)
        if ref["support"][c] or ref["predicted"][c]:
            assert d["precision"] == pytest.approx(ref["precision"][c])
            assert d["f1"] == pytest.approx(ref["f1"][c])
        else:
            assert d["precision"] is None and d["f1"] is None
    assert metrics["per_class"] == [d["recall"] for d in detail]


def test_long_tailed_chunks_equal_one_shot():
    scores, labels, counts, num_base = _long_tailed_case(seed=1, num_rows=500)
    names = [f"c{c}" for c in range(len(counts))]
    whole = evaluate(scores, labels, counts, num_base, classnames=names)
    accumulator = MetricAccumulator(counts, num_base, classnames=names)
    for chunk in torch.arange(len(labels)).split(37):
        accumulator.update(scores[chunk], labels[chunk])
    chunked = accumulator.compute()
    assert chunked.pop("eval_loss") == pytest.approx(whole.pop("eval_loss"), rel=1e-12)
    assert chunked == whole


def test_confused_pairs_by_hand():
    # (true -> predicted): 0->1 twice, 0 right once, 1->0 twice, 2->1 twice, 2->0 once, 2 right.
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([1, 1, 0, 0, 0, 1, 1, 0, 2])
    scores = torch.nn.functional.one_hot(predictions, 4).float()
    counts = [150, 50, 5, 0]
    metrics = evaluate(scores, labels, counts, 3, classnames=["ant", "bee", "cat", "dog"])
    assert metrics["confused_pairs"] == [
        {"true": 0, "predicted": 1, "count": 2, "true_name": "ant", "predicted_name": "bee"},
        {"true": 1, "predicted": 0, "count": 2, "true_name": "bee", "predicted_name": "ant"},
        {"true": 2, "predicted": 1, "count": 2, "true_name": "cat", "predicted_name": "bee"},
        {"true": 2, "predicted": 0, "count": 1, "true_name": "cat", "predicted_name": "ant"},
    ]
    # precision: ant 1/4, bee 0/4, cat 1/1; recall: 1/3, 0, 1/4; dog has no samples
    assert metrics["macro_precision"] == pytest.approx((1 / 4 + 0 + 1) / 3)
    assert metrics["balanced_accuracy"] == metrics["macro_recall"] == pytest.approx(7 / 36)
    assert metrics["macro_f1"] == pytest.approx((2 / 7 + 0 + 2 / 5) / 3)
    top2 = evaluate(scores, labels, counts, 3, num_confused_pairs=2)["confused_pairs"]
    assert top2 == [
        {"true": 0, "predicted": 1, "count": 2},
        {"true": 1, "predicted": 0, "count": 2},
    ]
    assert evaluate(scores[[2, 8]], labels[[2, 8]], counts, 3)["confused_pairs"] == []


def test_eval_loss_only_for_logits_and_detail_only_with_names():
    metrics = evaluate(SCORES, LABELS, COUNTS, 3)
    expected = torch.nn.functional.cross_entropy(SCORES.double(), LABELS).item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert "per_class_detail" not in metrics
    assert evaluate(SCORES, LABELS, COUNTS, 3, scores_are_logits=False)["eval_loss"] is None
    empty = evaluate(SCORES[:0], LABELS[:0], COUNTS, 3)
    assert empty["eval_loss"] is None and empty["balanced_accuracy"] is None
    assert empty["macro_f1"] is None and empty["confused_pairs"] == []


def test_accumulator_state_is_linear_in_classes_and_samples():
    num_classes, num_rows = 20_000, 3 * 64
    counts = torch.zeros(num_classes, dtype=torch.long)
    counts[:15_000] = torch.randint(1, 500, (15_000,), generator=torch.Generator().manual_seed(2))
    accumulator = MetricAccumulator(
        counts, 15_000, classnames=[f"c{c}" for c in range(num_classes)]
    )
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        accumulator.update(
            torch.randn(64, num_classes, generator=gen),
            torch.randint(0, num_classes, (64,), generator=gen),
        )
    sizes = {}
    for name, value in vars(accumulator).items():
        if isinstance(value, torch.Tensor | np.ndarray):
            sizes[name] = value.size if isinstance(value, np.ndarray) else value.numel()
        elif isinstance(value, dict | list | tuple):
            sizes[name] = len(value)
    assert sizes["_confusions"] <= num_rows  # one entry per mistake at most
    assert max(sizes.values()) <= num_classes, sizes
    assert len(accumulator.compute()["confused_pairs"]) == 20


def test_a_million_classes_in_chunks():
    num_classes = 1_000_000
    counts = torch.zeros(num_classes, dtype=torch.long)
    counts[:900_000] = 3
    counts[:1000] = 200
    accumulator = MetricAccumulator(counts, num_base_classes=900_000)
    gen = torch.Generator().manual_seed(1)
    for labels in (torch.tensor([5, 950_000, 899_999]), torch.tensor([999_999, 12])):
        scores = torch.rand(len(labels), num_classes, generator=gen)
        scores[torch.arange(len(labels)), labels] = 2.0
        accumulator.update(scores, labels)
    metrics = accumulator.compute()
    assert metrics["top1"] == 1.0 and metrics["hm"] == 1.0
    assert metrics["num_samples"]["many"] == 2 and metrics["num_samples"]["new"] == 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: evaluate(SCORES, torch.tensor([0, 0, 1, 2, 3, 4]), COUNTS, 3), "class id 4"),
        (lambda: evaluate(SCORES, LABELS[:5], COUNTS, 3), "6 rows but 5 labels"),
        (lambda: evaluate(SCORES, LABELS.float(), COUNTS, 3), "integer class ids"),
        (lambda: evaluate(SCORES[:, :3], LABELS, COUNTS, 3), "3 columns"),
        (lambda: evaluate(SCORES * float("nan"), LABELS, COUNTS, 3), "NaN"),
        (lambda: evaluate(SCORES, LABELS, [150, 0, 5, 0], 3), "base class 1 has no training"),
        (lambda: evaluate(SCORES, LABELS, COUNTS, 2), "new class 2 has 5 training"),
        (lambda: evaluate(SCORES, LABELS, COUNTS, 5), "num_base_classes"),
        (lambda: evaluate(SCORES, LABELS, [150, -1, 5, 0], 3), "negative count"),
        (lambda: topk_accuracy(SCORES, LABELS, ks=(0,)), "ks"),
        (lambda: evaluate(SCORES, LABELS, COUNTS, 3, classnames=["a", "b"]), "2 names"),
        (lambda: evaluate(SCORES, LABELS, COUNTS, 3, num_confused_pairs=-1), "num_confused"),
    ],
)
def test_bad_input_names_the_problem(call, match):
    with pytest.raises(UserInputError, match=match):
        call()


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plots_render(tmp_path):
    counts = np.array([500, 120, 60, 20, 5, 1, 0, 0])
    metrics = evaluate(
        torch.randn(40, 8, generator=torch.Generator().manual_seed(0)),
        torch.arange(40) % 8,
        counts,
        num_base_classes=6,
    )
    plot_per_class_accuracy(
        {"a": metrics["per_class"], "b": np.linspace(0, 1, 8)}, counts, tmp_path / "pc.png"
    )
    plot_per_class_accuracy(np.linspace(0, 1, 6), counts[:6], tmp_path / "pc1.png", title="one")
    plot_shot_groups({"a": metrics, "b": {**metrics, "new": None}}, tmp_path / "groups.png")
    steps = np.arange(300)
    plot_loss_curve(steps, {"x": np.exp(-steps / 50), "y": np.exp(-steps / 80)}, tmp_path / "l.png")
    plot_loss_curve(steps[:10], np.ones(10), tmp_path / "l1.png")
    for name in ("pc.png", "pc1.png", "groups.png", "l.png", "l1.png"):
        assert _is_png(tmp_path / name), name
    with pytest.raises(UserInputError, match="5 classes but train_counts has 8"):
        plot_per_class_accuracy(np.zeros(5), counts, tmp_path / "bad.png")
