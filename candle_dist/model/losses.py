"""Long-tailed classification losses on one interface: `loss(logits, targets) -> scalar`.

Every loss here is a cross-entropy of `logits + adjustment` (an additive per-class logit
adjustment, possibly zero) followed by a reduction of the per-row values. The head's chunked and
class-parallel path uses exactly those two pieces (`logit_adjustment`, `reduce`), so it never
needs the full logits; `forward` is the dense definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from candle_dist.errors import UserInputError


def _counts_tensor(class_counts) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise UserInputError(
            "class_counts must be a non-empty list of non-negative training-image counts, "
            f"one per class; got {counts.tolist()[:8]}..."
        )
    return counts


class AdjustedCrossEntropy(nn.Module):
    """Cross-entropy of `logits + logit_adjustment`, averaged over rows (the common base)."""

    name = "cross_entropy"

    def __init__(self, num_classes: int, logit_adjustment: torch.Tensor | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer(
            "logit_adjustment",
            logit_adjustment,
            persistent=False,
        )

    def per_row(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.num_classes:
            raise UserInputError(
                f"{self.name}: logits have {logits.shape[-1]} columns but the loss was built for "
                f"{self.num_classes} classes (class_counts length)"
            )
        if self.logit_adjustment is not None:
            logits = logits + self.logit_adjustment.to(logits.dtype)
        return F.cross_entropy(logits, targets, reduction="none")

    def reduce(self, per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over rows; subclasses weight or transform rows."""
        return per_row.mean()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.per_row(logits, targets), targets)


class CrossEntropyLoss(AdjustedCrossEntropy):
    """Plain softmax cross-entropy (no prior)."""

    def __init__(self, class_counts):
        super().__init__(len(_counts_tensor(class_counts)))


class CompensatingLogitAdjustedLoss(AdjustedCrossEntropy):
    """Candle's CLA: CE of `logits + tau * log pi`, pi_c = (n_c + 1) / sum_k (n_k + 1).

    The +1 is the prototype row each class adds to every batch; it keeps classes without
    training images (new classes) at a finite prior.
    """

    name = "cla"

    def __init__(self, class_counts, tau: float = 1.0):
        counts = _counts_tensor(class_counts) + 1.0
        super().__init__(len(counts), tau * torch.log(counts / counts.sum()))
        self.tau = tau


class LogitAdjustedLoss(AdjustedCrossEntropy):
    """Logit adjustment (Menon et al.): CE of `logits + tau * log pi`, pi from counts without +1.

    Classes with no training images have no prior: their columns are excluded (adjustment
    -inf) and rows whose target is such a class do not count.
    """

    name = "logit_adjusted"

    def __init__(self, class_counts, tau: float = 1.0):
        counts = _counts_tensor(class_counts)
        if counts.sum() <= 0:
            raise UserInputError("logit_adjusted: every class count is 0; nothing has a prior")
        prior = counts / counts.sum()
        excluded = torch.full_like(prior, -torch.inf)
        adjustment = torch.where(counts > 0, tau * torch.log(prior), excluded)
        super().__init__(len(counts), adjustment)
        self.register_buffer("has_prior", counts > 0, persistent=False)
        self.tau = tau

    def reduce(self, per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = self.has_prior[targets]
        kept = torch.where(keep, per_row, torch.zeros_like(per_row))
        return kept.sum() / keep.sum().clamp(min=1)


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax (Ren et al. 2020): CE of `logits + log n_c`.

    Mathematically logit adjustment with tau = 1 (log n_c and log pi_c differ by a constant per
    row); kept under its own name because it is reported as its own baseline.
    """

    name = "balanced_softmax"

    def __init__(self, class_counts):
        super().__init__(class_counts, tau=1.0)


class FocalLoss(AdjustedCrossEntropy):
    """Focal loss (Lin et al.): mean of (1 - p_t)^gamma * CE, p_t = exp(-CE)."""

    name = "focal"

    def __init__(self, class_counts, gamma: float = 2.0):
        super().__init__(len(_counts_tensor(class_counts)))
        self.gamma = gamma

    def reduce(self, per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((1.0 - torch.exp(-per_row)) ** self.gamma * per_row).mean()


class ClassBalancedLoss(AdjustedCrossEntropy):
    """Class-balanced reweighting (Cui et al.): weight (1 - beta) / (1 - beta^n) per class.

    n counts the prototype row too (n_c + 1), so classes without images get a finite weight;
    weights are normalized to mean 1 and the loss is the weighted mean, as F.cross_entropy does.
    """

    name = "class_balanced"

    def __init__(self, class_counts, beta: float = 0.9999):
        counts = _counts_tensor(class_counts) + 1.0
        super().__init__(len(counts))
        weights = (1.0 - beta) / (1.0 - beta**counts)
        self.register_buffer("class_weights", weights / weights.mean(), persistent=False)
        self.beta = beta

    def reduce(self, per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = self.class_weights[targets].to(per_row.dtype)
        return (weights * per_row).sum() / weights.sum()


LOSSES: dict[str, type[AdjustedCrossEntropy]] = {
    "cla": CompensatingLogitAdjustedLoss,
    "cross_entropy": CrossEntropyLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "focal": FocalLoss,
    "class_balanced": ClassBalancedLoss,
}


def build_loss(name: str, class_counts, **options) -> AdjustedCrossEntropy:
    """The loss called `name` (see LOSSES) for these per-class training counts."""
    if name not in LOSSES:
        raise UserInputError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name](class_counts, **options)
