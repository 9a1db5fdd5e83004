"""Which training samples an epoch visits, in which order: instance-uniform or class-rebalanced.

`train.sampler` picks how often a class is drawn, as a power q of its training count n_c:

| sampler          | class drawn with probability | samples                            |
|------------------|------------------------------|------------------------------------|
| `uniform`        | ∝ n_c (q = 1)                | a permutation: each sample once    |
| `square_root`    | ∝ n_c^0.5                    | N draws with replacement           |
| `class_balanced` | ∝ 1 (q = 0)                  | N draws with replacement           |

A rebalanced epoch has as many draws as the training set has samples (N); a draw picks a class
by its probability, then one of its samples uniformly. Classes without training images (new
classes) are never drawn. The order depends only on (seed, epoch) and the labels, never on the
rank count, so P ranks share the same global batches, and a run resumed mid-epoch recomputes the
epoch's order and continues where it stopped.
"""

from __future__ import annotations

import numpy as np

from candle_dist.errors import UserInputError

SAMPLERS = {"uniform": 1.0, "square_root": 0.5, "class_balanced": 0.0}


def epoch_indices(sampler: str, seed: int, epoch: int, labels: np.ndarray) -> np.ndarray:
    """The sample indices epoch `epoch` visits, in order (int64, length N = len(labels))."""
    if sampler not in SAMPLERS:
        raise UserInputError(
            f"unknown train.sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}"
        )
    num_samples = len(labels)
    if sampler == "uniform":
        return np.random.default_rng([seed, epoch]).permutation(num_samples)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    weights = counts[present].astype(np.float64) ** SAMPLERS[sampler]
    rng = np.random.default_rng([seed, epoch, 3])
    drawn = present[rng.choice(len(present), size=num_samples, p=weights / weights.sum())]
    by_class = np.argsort(labels, kind="stable")  # each class's samples, contiguous
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = np.floor(rng.random(num_samples) * counts[drawn]).astype(np.int64)
    return by_class[starts[drawn] + within]
