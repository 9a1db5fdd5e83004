"""Long-tailed classification metrics: top-k, per-class, shot groups, base/new/harmonic mean.

Everything is counted per class with `bincount`, so a metric needs O(C) memory besides the
scores it is given, and `MetricAccumulator` takes the score matrix in row chunks: at 10^5+
classes the trainer never holds all N x C scores. Inputs may be torch tensors (any device)
or numpy arrays.

Conventions (docs/method.md, "Metrics"):
- prediction = argmax of the scores; on ties the lowest class id wins; NaN scores are an
  error (a broken model), not a wrong prediction;
- shot groups by training count: many > 100, medium 20..100 (inclusive), few < 20; a new
  class (count 0) is "few" by count and is also reported in its own group "new";
- many/medium/few accuracy is the sample-averaged accuracy of all-column predictions over
  the samples whose class is in the group (as the paper reports it);
- base accuracy: samples of base classes (ids < num_base_classes), argmax over base columns
  only; new accuracy: samples of new classes, argmax over new columns only; hm = 2bn/(b+n),
  0 when either is 0; "all": every sample, argmax over all columns (equal to top1, under
  the base-to-new protocol's name);
- balanced accuracy: mean per-class recall over the classes that have validation samples;
  macro precision / recall / F1 average the per-class values over the same classes (sklearn's
  `average="macro"` with `labels` = the classes present in y_true, `zero_division=0`): a class
  never predicted has precision 0, per-class F1 = 2 TP / (predicted + support) (the harmonic
  mean of its precision and recall, 0 when both are 0), and macro F1 averages the per-class F1
  (not the F1 of macro precision and recall); macro recall equals balanced accuracy;
- eval_loss: mean cross-entropy `logsumexp(scores) - scores[label]` when the scores are logits
  (None otherwise); inf when a label's score is -inf;
- confused pairs: the (true, predicted) pairs of top-1 mistakes, most frequent first, ties
  by lower true then predicted id;
- a metric over no samples is None (JSON null), never NaN.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from candle_dist.errors import UserInputError

ArrayLike = torch.Tensor | np.ndarray | Sequence

MANY_SHOT_MIN = 101  # many-shot: more than 100 training images
FEW_SHOT_MAX = 19  # few-shot: fewer than 20 training images
NUM_CONFUSED_PAIRS = 20


def _tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """A torch view of `x` (numpy arrays are shared, not copied)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise UserInputError(
            f"{name}: expected an array of numbers, got {type(x).__name__}"
        ) from err


def _labels(labels: ArrayLike, name: str = "labels") -> torch.Tensor:
    """Integer class ids [N] as int64."""
    labels = _tensor(labels, name)
    if labels.ndim != 1:
        raise UserInputError(f"{name}: expected shape [N], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise UserInputError(f"{name}: expected integer class ids, got dtype {labels.dtype}")
    return labels.long()


def _check_range(labels: torch.Tensor, num_classes: int, name: str = "labels") -> None:
    """Every class id lies in [0, num_classes)."""
    outside = (labels < 0) | (labels >= num_classes)
    if labels.numel() and bool(outside.any()):
        raise UserInputError(
            f"{name}: class id {int(labels[outside][0])} is outside [0, {num_classes}); "
            "labels must index the score columns / class list"
        )


def _check_ks(ks: Sequence[int]) -> None:
    """At least one k, all >= 1."""
    if not ks or any(k < 1 for k in ks):
        raise UserInputError(f"ks: give one or more k >= 1, got {list(ks)}")


def _scores(scores: ArrayLike, num_rows: int, name: str = "scores") -> torch.Tensor:
    """Scores [N, C >= 1], N matching the labels (NaN is caught by `_predict`)."""
    scores = _tensor(scores, name)
    if scores.ndim != 2:
        raise UserInputError(f"{name}: expected shape [N, C], got {list(scores.shape)}")
    if scores.shape[0] != num_rows:
        raise UserInputError(
            f"{name}: {scores.shape[0]} rows but {num_rows} labels; give one label per row"
        )
    if scores.shape[1] == 0:
        raise UserInputError(f"{name}: no class columns")
    return scores


def _predict(scores: torch.Tensor, name: str = "scores") -> torch.Tensor:
    """Argmax of each row (first maximum on ties); rejects NaN, which max propagates."""
    best, predictions = scores.max(dim=1)
    if best.dtype.is_floating_point and bool(torch.isnan(best).any()):
        raise UserInputError(f"{name}: contains NaN; check the model outputs before evaluating")
    return predictions


def _counts(train_counts: ArrayLike) -> torch.Tensor:
    """Per-class training counts [C] as int64 on the CPU, checked non-negative."""
    counts = _tensor(train_counts, "train_counts").cpu()
    if counts.ndim != 1:
        raise UserInputError(f"train_counts: expected shape [C], got {list(counts.shape)}")
    if counts.dtype.is_floating_point and not bool((counts == counts.round()).all()):
        raise UserInputError("train_counts: expected whole numbers of training images")
    counts = counts.long()
    if counts.numel() and int(counts.min()) < 0:
        bad = int(torch.nonzero(counts < 0)[0])
        raise UserInputError(f"train_counts: class {bad} has a negative count {int(counts[bad])}")
    return counts


def _classnames(classnames: Sequence[str] | None, num_classes: int) -> list[str] | None:
    """The class names as a list of C strings (or None), so results can be read by name."""
    if classnames is None:
        return None
    names = [str(name) for name in classnames]
    if len(names) != num_classes:
        raise UserInputError(
            f"classnames: {len(names)} names but train_counts has {num_classes} classes; "
            "give one name per class, base then new"
        )
    return names


def _mean_over(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean of `values` where `mask` holds, None when it holds nowhere."""
    return float(values[mask].mean()) if bool(mask.any()) else None


def _ratio(numerator: int | torch.Tensor, denominator: int | torch.Tensor) -> float | None:
    """numerator / denominator as a float, None when there is nothing to average over."""
    denominator = int(denominator)
    return None if denominator == 0 else int(numerator) / denominator


def harmonic_mean(base: float | None, new: float | None) -> float | None:
    """2bn/(b+n); 0 when either is 0; None when either is missing."""
    if base is None or new is None:
        return None
    return 0.0 if base == 0 or new == 0 else 2 * base * new / (base + new)


def topk_accuracy(
    scores: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)
) -> dict[str, float | None]:
    """Top-k accuracy for each k as {"top1": ..., "top5": ...}; k > C counts as k = C."""
    _check_ks(ks)
    labels_t = _labels(labels)
    scores_t = _scores(scores, labels_t.numel())
    _check_range(labels_t, scores_t.shape[1])
    labels_t = labels_t.to(scores_t.device)
    hits = _topk_hits(scores_t, labels_t, _predict(scores_t), ks)
    return {f"top{k}": _ratio(hits[k], labels_t.numel()) for k in ks}


def _topk_hits(
    scores: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, ks: Sequence[int]
) -> dict[int, int]:
    """Number of rows whose label is among the k highest scores, for each k (top-1 = argmax)."""
    hits = {1: int((predictions == labels).sum())}
    kmax = min(max(ks), scores.shape[1])
    if kmax > 1 and labels.numel():
        in_topk = scores.topk(kmax, dim=1).indices == labels[:, None]
        for k in ks:
            if k > 1:
                hits[k] = int(in_topk[:, : min(k, kmax)].any(dim=1).sum())
    return {k: hits.get(k, 0) for k in ks}


def per_class_accuracy(predictions: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Accuracy of each class [C] (float64); NaN for classes without samples."""
    labels_t = _labels(labels).cpu()
    predictions_t = _labels(predictions, "predictions").cpu()
    if predictions_t.shape != labels_t.shape:
        raise UserInputError(
            f"predictions: {predictions_t.numel()} entries but {labels_t.numel()} labels"
        )
    _check_range(labels_t, num_classes)
    _check_range(predictions_t, num_classes, "predictions")
    total = torch.bincount(labels_t, minlength=num_classes).numpy()
    correct = torch.bincount(labels_t[predictions_t == labels_t], minlength=num_classes).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def shot_groups(train_counts: ArrayLike) -> dict[str, np.ndarray]:
    """Class ids per group: many (> 100), medium (20..100), few (< 20, new included), new (0)."""
    counts = _counts(train_counts).numpy()
    return {
        "many": np.flatnonzero(counts >= MANY_SHOT_MIN),
        "medium": np.flatnonzero((counts > FEW_SHOT_MAX) & (counts < MANY_SHOT_MIN)),
        "few": np.flatnonzero(counts <= FEW_SHOT_MAX),
        "new": np.flatnonzero(counts == 0),
    }


class MetricAccumulator:
    """All of `evaluate`'s metrics, fed row chunks of the score matrix one at a time.

    State is four per-class counters, the top-k hit counts, a loss sum and a count per
    (true, predicted) pair of the mistakes (at most one entry per sample, never C x C), so the
    chunks may come from any number of batches; `compute()` equals `evaluate` on the
    concatenated chunks (eval_loss up to float64 rounding of its sum).

    `scores_are_logits=False` (e.g. cosine similarities or probabilities) reports eval_loss as
    None, since cross-entropy of such scores means nothing. With `classnames`, confused pairs
    carry names and "per_class_detail" lists every class's counts, precision, recall and F1;
    without them that list is left out, which keeps the per-epoch training log small.

        acc = MetricAccumulator(train_counts, num_base_classes=c_base)
        for features, labels in val_loader:
            acc.update(model(features), labels)
        metrics = acc.compute()
    """

    def __init__(
        self,
        train_counts: ArrayLike,
        num_base_classes: int,
        ks: Sequence[int] = (1, 5),
        *,
        classnames: Sequence[str] | None = None,
        scores_are_logits: bool = True,
        num_confused_pairs: int = NUM_CONFUSED_PAIRS,
    ) -> None:
        self.train_counts = _counts(train_counts)
        self.num_classes = int(self.train_counts.numel())
        self.num_base_classes = int(num_base_classes)
        self.ks = tuple(int(k) for k in ks)
        _check_split(self.train_counts, self.num_base_classes)
        _check_ks(self.ks)
        self.classnames = _classnames(classnames, self.num_classes)
        self.scores_are_logits = bool(scores_are_logits)
        if num_confused_pairs < 0:
            raise UserInputError(f"num_confused_pairs: must be >= 0, got {num_confused_pairs}")
        self.num_confused_pairs = int(num_confused_pairs)
        self._samples = torch.zeros(self.num_classes, dtype=torch.long)
        self._correct = torch.zeros(self.num_classes, dtype=torch.long)
        self._correct_own_split = torch.zeros(self.num_classes, dtype=torch.long)
        self._predicted = torch.zeros(self.num_classes, dtype=torch.long)
        self._topk_hits = dict.fromkeys(self.ks, 0)
        self._loss_sum = 0.0
        self._confusions: Counter[int] = Counter()  # true * C + predicted -> mistakes

    def update(self, scores: ArrayLike, labels: ArrayLike) -> None:
        """Add one chunk: scores [n, C] over all classes and their labels [n]."""
        labels_t = _labels(labels)
        scores_t = _scores(scores, labels_t.numel())
        if scores_t.shape[1] != self.num_classes:
            raise UserInputError(
                f"scores: {scores_t.shape[1]} columns but train_counts has {self.num_classes} "
                "classes; score every class, base then new"
            )
        _check_range(labels_t, self.num_classes)
        labels_t = labels_t.to(scores_t.device)
        c, b = self.num_classes, self.num_base_classes

        predictions = _predict(scores_t)
        correct = predictions == labels_t
        self._samples += torch.bincount(labels_t, minlength=c).cpu()
        self._correct += torch.bincount(labels_t[correct], minlength=c).cpu()
        self._predicted += torch.bincount(predictions, minlength=c).cpu()
        wrong = ~correct
        if bool(wrong.any()):
            pairs, counts = torch.unique(
                labels_t[wrong] * c + predictions[wrong], return_counts=True
            )
            self._confusions.update(dict(zip(pairs.tolist(), counts.tolist(), strict=True)))
        if self.scores_are_logits and labels_t.numel():
            # float32 at least (bf16 logsumexp is too coarse), never a float64 copy of the chunk
            logits = scores_t.to(torch.promote_types(scores_t.dtype, torch.float32))
            losses = logits.logsumexp(dim=1) - logits.gather(1, labels_t[:, None]).squeeze(1)
            self._loss_sum += float(losses.double().sum())
        for k, hits in _topk_hits(scores_t, labels_t, predictions, self.ks).items():
            self._topk_hits[k] += hits

        # Argmax within the row's own split (base or new columns): the all-column argmax
        # unless that falls in the other split, so only those rows are searched again.
        is_base = labels_t < b
        own = predictions.clone()
        redo = torch.nonzero(is_base != (predictions < b)).squeeze(1)
        redo_base, redo_new = redo[is_base[redo]], redo[~is_base[redo]]
        if redo_base.numel():
            own[redo_base] = scores_t[redo_base, :b].argmax(dim=1)
        if redo_new.numel():
            own[redo_new] = scores_t[redo_new, b:].argmax(dim=1) + b
        self._correct_own_split += torch.bincount(labels_t[own == labels_t], minlength=c).cpu()

    def compute(self) -> dict[str, Any]:
        """The metrics so far as JSON-ready values (floats, ints, None, lists)."""
        b = self.num_base_classes
        samples, correct, own = self._samples, self._correct, self._correct_own_split
        total = int(samples.sum())
        groups = {
            name: torch.from_numpy(ids) for name, ids in shot_groups(self.train_counts).items()
        }

        metrics: dict[str, Any] = {
            f"top{k}": _ratio(hits, total) for k, hits in self._topk_hits.items()
        }
        for name in ("many", "medium", "few"):
            ids = groups[name]
            metrics[name] = _ratio(correct[ids].sum(), samples[ids].sum())
        metrics["base"] = _ratio(own[:b].sum(), samples[:b].sum())
        metrics["new"] = _ratio(own[b:].sum(), samples[b:].sum())
        metrics["hm"] = harmonic_mean(metrics["base"], metrics["new"])
        metrics["all"] = _ratio(correct.sum(), total)
        accuracy = (correct.double() / samples.clamp(min=1)).tolist()
        metrics["per_class"] = [
            acc if count else None for acc, count in zip(accuracy, samples.tolist(), strict=True)
        ]
        metrics["num_samples"] = {
            "all": total,
            **{name: int(samples[groups[name]].sum()) for name in ("many", "medium", "few")},
            "base": int(samples[:b].sum()),
            "new": int(samples[b:].sum()),
        }
        metrics["num_classes"] = {
            "all": self.num_classes,
            **{name: int(groups[name].numel()) for name in ("many", "medium", "few")},
            "base": b,
            "new": self.num_classes - b,
        }
        metrics.update(self._macro_metrics())
        metrics["eval_loss"] = self._loss_sum / total if self.scores_are_logits and total else None
        metrics["confused_pairs"] = self._confused_pairs()
        if self.classnames is not None:
            metrics["per_class_detail"] = self._per_class_detail(self.classnames)
        return metrics

    def _macro_metrics(self) -> dict[str, float | None]:
        """Balanced accuracy and macro precision / recall / F1 over classes with support."""
        support, hits, predicted = self._samples, self._correct.double(), self._predicted
        present = support > 0
        recall = _mean_over(hits / support.clamp(min=1), present)
        return {
            "balanced_accuracy": recall,
            "macro_precision": _mean_over(hits / predicted.clamp(min=1), present),
            "macro_recall": recall,
            "macro_f1": _mean_over(2 * hits / (predicted + support).clamp(min=1), present),
        }

    def mistakes(self) -> dict[tuple[int, int], int]:
        """Every mistake so far, counted by (true class, predicted class)."""
        return {divmod(pair, self.num_classes): n for pair, n in self._confusions.items()}

    def _confused_pairs(self) -> list[dict[str, Any]]:
        """The most frequent mistakes as {"true", "predicted", "count"} (+ names)."""
        c, names = self.num_classes, self.classnames
        top = heapq.nsmallest(
            self.num_confused_pairs, self._confusions.items(), key=lambda item: (-item[1], item[0])
        )
        pairs = []
        for pair, count in top:
            true, predicted = divmod(pair, c)
            entry: dict[str, Any] = {"true": true, "predicted": predicted, "count": count}
            if names is not None:
                entry.update(true_name=names[true], predicted_name=names[predicted])
            pairs.append(entry)
        return pairs

    def _per_class_detail(self, names: list[str]) -> list[dict[str, Any]]:
        """Every class by id and name: counts and the per-class values the macro means average
        (None where a value is undefined: recall without support, precision and F1 of a class
        neither present nor predicted)."""
        rows = zip(
            names,
            self.train_counts.tolist(),
            self._samples.tolist(),
            self._predicted.tolist(),
            self._correct.tolist(),
            strict=True,
        )
        detail = []
        for i, (name, train_count, support, predicted, hits) in enumerate(rows):
            seen = support + predicted > 0
            detail.append(
                {
                    "id": i,
                    "name": name,
                    "train_count": train_count,
                    "support": support,
                    "predicted": predicted,
                    "correct": hits,
                    "precision": hits / predicted if predicted else (0.0 if seen else None),
                    "recall": hits / support if support else None,
                    "f1": 2 * hits / (support + predicted) if seen else None,
                }
            )
        return detail


def _check_split(counts: torch.Tensor, num_base_classes: int) -> None:
    """Base classes (ids < num_base_classes) have training images; new classes have none."""
    num_classes = counts.numel()
    if not 0 <= num_base_classes <= num_classes:
        raise UserInputError(
            f"num_base_classes: {num_base_classes} is outside [0, {num_classes}] "
            f"(train_counts has {num_classes} classes)"
        )
    empty_base = torch.nonzero(counts[:num_base_classes] == 0)
    if empty_base.numel():
        raise UserInputError(
            f"train_counts: base class {int(empty_base[0])} has no training images; "
            "order classes base first, then new, and set num_base_classes to the number of "
            "classes with images"
        )
    new_with_images = torch.nonzero(counts[num_base_classes:] > 0)
    if new_with_images.numel():
        cls = num_base_classes + int(new_with_images[0])
        raise UserInputError(
            f"train_counts: new class {cls} has {int(counts[cls])} training images; new classes "
            f"(ids >= num_base_classes = {num_base_classes}) must have none"
        )


def evaluate(
    scores: ArrayLike,
    labels: ArrayLike,
    train_counts: ArrayLike,
    num_base_classes: int,
    ks: Sequence[int] = (1, 5),
    *,
    classnames: Sequence[str] | None = None,
    scores_are_logits: bool = True,
    num_confused_pairs: int = NUM_CONFUSED_PAIRS,
) -> dict[str, Any]:
    """All metrics of one score matrix [N, C] at once (see the module docstring)."""
    accumulator = MetricAccumulator(
        train_counts,
        num_base_classes,
        ks,
        classnames=classnames,
        scores_are_logits=scores_are_logits,
        num_confused_pairs=num_confused_pairs,
    )
    accumulator.update(scores, labels)
    return accumulator.compute()


def _jsonable(value: Any) -> Any:
    """Plain JSON values: arrays to lists, numpy/torch scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor | np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(metrics: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `metrics` as JSON atomically (temp file + rename): a kill leaves old or new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_jsonable(metrics), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
