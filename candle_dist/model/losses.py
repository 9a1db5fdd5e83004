"""Long-tailed classification losses on one interface: `loss(logits, targets) -> scalar`.

Every loss here is a cross-entropy of `logits + logit_adjustment` (an additive per-class logit
adjustment, possibly zero; plus `target_offset`, a per-row shift of the target logit only)
followed by a reduction of the per-row values, plus, for LADE, a term over per-class column
statistics. The head's chunked and class-parallel path uses exactly those pieces
(`logit_adjustment`, `target_offset`, `reduce`, `column_term`), so it never needs the full
logits; `forward` is the dense definition.

Losses and options (`build_loss(name, class_counts, **options)`), defaults as shown:

- `cla`: `tau=1.0`. CE of `z + tau log pi`, pi from n + 1 (finite for new classes).
- `cross_entropy`: no options.
- `logit_adjusted`: `tau=1.0`, `count_offset=0.0`. Classes with 0 images are excluded.
- `balanced_softmax`: `count_offset=0.0`. Classes with 0 images are excluded.
- `focal`: `gamma=2.0`.
- `class_balanced`: `beta=0.9999`, `count_offset=0.0`.
- `ldam`: `max_margin=0.5`, `margin_scale=30.0`, `count_offset=0.0`.
- `lade`: `remine_lambda=0.1`, `estim_loss_weight=0.1`, `count_offset=0.0`.
- `grw`: `exp_scale=1.0`, `count_offset=0.0`.

`count_offset` is added to every class count before the formula. `class_balanced`, `ldam`,
`lade` and `grw` are undefined for a class with 0 images (an infinite weight, margin or
log-prior) and refuse such counts unless `count_offset` > 0.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from candle_dist.errors import UserInputError

# LADE's constants as published: they keep its logs and its division finite on empty classes
LADE_LOG_EPS = 1e-9
LADE_COUNT_EPS = 1e-8


def _counts_tensor(class_counts, count_offset: float = 0.0) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise UserInputError(
            "class_counts must be a non-empty list of non-negative training-image counts, "
            f"one per class; got {counts.tolist()[:8]}..."
        )
    if not (math.isfinite(count_offset) and count_offset >= 0):
        raise UserInputError(
            f"count_offset is {count_offset}: it must be a finite number >= 0 (1 counts each "
            "class's prototype row)"
        )
    return counts + count_offset


def _require_images(counts: torch.Tensor, loss: str, why: str) -> None:
    """Refuse counts with empty classes for a loss whose formula is undefined there."""
    empty = torch.nonzero(counts <= 0).flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        raise UserInputError(
            f"{loss}: {len(empty)} classes have 0 training images (ids {shown}), where {why}; "
            "set count_offset=1 (config loss.count_offset) or use the loss cla"
        )


class AdjustedCrossEntropy(nn.Module):
    """Cross-entropy of `logits + logit_adjustment`, averaged over rows (the common base)."""

    name = "cross_entropy"
    # whether `column_term` adds to the loss (the head computes column statistics only then)
    column_statistics = False

    def __init__(self, num_classes: int, logit_adjustment: torch.Tensor | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer(
            "logit_adjustment",
            logit_adjustment,
            persistent=False,
        )

    def target_offset(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Per-row shift of the target logit (after the adjustment), or None."""
        return None

    def per_row(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.num_classes:
            raise UserInputError(
                f"{self.name}: logits have {logits.shape[-1]} columns but the loss was built for "
                f"{self.num_classes} classes (class_counts length)"
            )
        if self.logit_adjustment is not None:
            logits = logits + self.logit_adjustment.to(logits.dtype)
        offset = self.target_offset(targets)
        if offset is not None:
            logits = logits.scatter_add(1, targets[:, None], offset.to(logits.dtype)[:, None])
        return F.cross_entropy(logits, targets, reduction="none")

    def reduce(self, per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over rows; subclasses weight or transform rows."""
        return per_row.mean()

    def column_term(
        self,
        column_lse: torch.Tensor,
        target_sums: torch.Tensor,
        targets: torch.Tensor,
        classes: torch.Tensor,
    ) -> torch.Tensor:
        """The loss's share from `classes` given, per class, the log-sum-exp of its raw logit
        column over all rows and the sum of its raw logit over rows targeting it; the shares of
        disjoint class sets add up. Used only when `column_statistics`."""
        raise NotImplementedError(f"{self.name} has no column term")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.reduce(self.per_row(logits, targets), targets)
        if not self.column_statistics:
            return loss
        at_target = logits.gather(1, targets[:, None]).squeeze(1)
        target_sums = logits.new_zeros(self.num_classes).index_add_(0, targets, at_target)
        classes = torch.arange(self.num_classes, device=logits.device)
        column_lse = torch.logsumexp(logits, dim=0)
        return loss + self.column_term(column_lse, target_sums, targets, classes)


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

    def __init__(self, class_counts, tau: float = 1.0, count_offset: float = 0.0):
        counts = _counts_tensor(class_counts, count_offset)
        if counts.sum() <= 0:
            raise UserInputError(f"{self.name}: every class count is 0; nothing has a prior")
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

    def __init__(self, class_counts, count_offset: float = 0.0):
        super().__init__(class_counts, tau=1.0, count_offset=count_offset)


class FocalLoss(AdjustedCrossEntropy):
    """Focal loss (Lin et al.): mean of (1 - p_t)^gamma * CE, p_t = exp(-CE)."""

    name = "focal"

    def __init__(self, class_counts, gamma: float = 2.0):
        super().__init__(len(_counts_tensor(class_counts)))
        self.gamma = gamma

    def reduce(self, per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((1.0 - torch.exp(-per_row)) ** self.gamma * per_row).mean()


class _ReweightedLoss(AdjustedCrossEntropy):
    """CE weighted per row by its target's class weight (normalized to mean 1 over classes);
    the weighted mean over rows, as F.cross_entropy with `weight` computes it."""

    def __init__(self, weights: torch.Tensor):
        super().__init__(len(weights))
        self.register_buffer("class_weights", weights / weights.mean(), persistent=False)

    def reduce(self, per_row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = self.class_weights[targets].to(per_row.dtype)
        return (weights * per_row).sum() / weights.sum()


class ClassBalancedLoss(_ReweightedLoss):
    """Class-balanced reweighting (Cui et al.): weight (1 - beta) / (1 - beta^n) per class.

    With the default `count_offset` 0 this is the published definition, undefined for classes
    without images; `count_offset=1` counts each class's prototype row, as Candle's batches do.
    """

    name = "class_balanced"

    def __init__(self, class_counts, beta: float = 0.9999, count_offset: float = 0.0):
        counts = _counts_tensor(class_counts, count_offset)
        _require_images(counts, self.name, "the weight (1 - beta) / (1 - beta^0) is infinite")
        super().__init__((1.0 - beta) / (1.0 - beta**counts))
        self.beta = beta


class GeneralizedReweightLoss(_ReweightedLoss):
    """Generalized re-weighting (Zhang et al., GRW): weight pi_c^(-exp_scale) per class."""

    name = "grw"

    def __init__(self, class_counts, exp_scale: float = 1.0, count_offset: float = 0.0):
        counts = _counts_tensor(class_counts, count_offset)
        _require_images(counts, self.name, "the weight pi^(-exp_scale) is infinite")
        super().__init__((counts / counts.sum()) ** -exp_scale)
        self.exp_scale = exp_scale


class LDAMLoss(AdjustedCrossEntropy):
    """LDAM (Cao et al.): CE after subtracting `margin_scale * m_y` from the target logit only,
    m_c proportional to n_c^(-1/4) with the largest `max_margin`. The logits are already
    scaled, so the scale applies to the margin alone, as in the published code."""

    name = "ldam"

    def __init__(
        self,
        class_counts,
        max_margin: float = 0.5,
        margin_scale: float = 30.0,
        count_offset: float = 0.0,
    ):
        counts = _counts_tensor(class_counts, count_offset)
        _require_images(counts, self.name, "the margin n^(-1/4) is infinite")
        super().__init__(len(counts))
        margins = counts**-0.25
        self.register_buffer("margins", margins * (max_margin / margins.max()), persistent=False)
        self.max_margin, self.margin_scale = max_margin, margin_scale

    def target_offset(self, targets: torch.Tensor) -> torch.Tensor:
        return -self.margin_scale * self.margins[targets]


class LADELoss(AdjustedCrossEntropy):
    """LADE (Hong et al.): CE of `z + log pi` minus `estim_loss_weight` times the regularized
    MINE estimate sum_c pi_c [T1_c - T2_c - remine_lambda T2_c^2], where over the N rows

        T1_c = (sum of z_c over rows targeting c) / (their count + 1e-8)
        T2_c = logsumexp_rows(z_c - log(pi_c + 1e-9) + log(1/C + 1e-9)) - log N

    as the published code computes it (its epsilons included): a class no row targets has
    T1_c = 0 but still contributes -T2_c - remine_lambda T2_c^2. In the head every class of
    the columns has its prototype row, so this arises only for dense logits.
    """

    name = "lade"
    column_statistics = True

    def __init__(
        self,
        class_counts,
        remine_lambda: float = 0.1,
        estim_loss_weight: float = 0.1,
        count_offset: float = 0.0,
    ):
        counts = _counts_tensor(class_counts, count_offset)
        _require_images(counts, self.name, "the log-prior log(n / sum n) is -inf")
        prior = counts / counts.sum()
        super().__init__(len(counts), torch.log(prior))
        self.register_buffer("prior", prior, persistent=False)
        shift = math.log(1.0 / len(counts) + LADE_LOG_EPS) - torch.log(prior + LADE_LOG_EPS)
        self.register_buffer("column_shift", shift, persistent=False)
        self.remine_lambda, self.estim_loss_weight = remine_lambda, estim_loss_weight

    def column_term(
        self,
        column_lse: torch.Tensor,
        target_sums: torch.Tensor,
        targets: torch.Tensor,
        classes: torch.Tensor,
    ) -> torch.Tensor:
        dtype = torch.promote_types(column_lse.dtype, torch.float32)
        rows_per_class = torch.zeros(self.num_classes, dtype=dtype, device=targets.device)
        rows_per_class.index_add_(0, targets, torch.ones_like(targets, dtype=dtype))
        first = target_sums.to(dtype) / (rows_per_class[classes] + LADE_COUNT_EPS)
        second = (
            column_lse.to(dtype) + self.column_shift[classes].to(dtype) - math.log(targets.shape[0])
        )
        estimate = first - second - self.remine_lambda * second**2
        return -self.estim_loss_weight * (self.prior[classes].to(dtype) * estimate).sum()


LOSSES: dict[str, type[AdjustedCrossEntropy]] = {
    "cla": CompensatingLogitAdjustedLoss,
    "cross_entropy": CrossEntropyLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "focal": FocalLoss,
    "class_balanced": ClassBalancedLoss,
    "ldam": LDAMLoss,
    "lade": LADELoss,
    "grw": GeneralizedReweightLoss,
}


def loss_options(name: str) -> dict[str, object]:
    """The options of the loss called `name` and their defaults."""
    parameters = list(inspect.signature(LOSSES[name]).parameters.values())[1:]
    return {parameter.name: parameter.default for parameter in parameters}


def build_loss(name: str, class_counts, **options) -> AdjustedCrossEntropy:
    """The loss called `name` (see LOSSES) for these per-class training counts."""
    if name not in LOSSES:
        raise UserInputError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    unknown = sorted(set(options) - set(loss_options(name)))
    if unknown:
        accepted = ", ".join(loss_options(name)) or "none"
        raise UserInputError(
            f"loss {name!r} has no option {', '.join(unknown)}: its options are {accepted}"
        )
    return LOSSES[name](class_counts, **options)
