"""The Candle prototype head (docs/method.md), class-parallel when a process group is given.

With one process it is the head of the paper; with P processes each rank holds a contiguous
range of classes (its text features, visual and virtual prototypes, prototype rows) and its
share of the batch, and the result equals the one-process result to float tolerance.

    head = CandleHead(text_features=text, visual_prototypes=protos, logit_scale=4.6052)
    loss, parts = head.loss(image_features, labels, CompensatingLogitAdjustedLoss(counts))
    logits0, logits_vt, logits_vv = head(image_features, phase="test")
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from candle_dist.errors import UserInputError
from candle_dist.model.fusion import Fusion
from candle_dist.model.losses import AdjustedCrossEntropy
from candle_dist.model.sharded_state import ClassShardedState
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.cross_entropy import (
    class_parallel_column_statistics,
    class_parallel_cross_entropy,
    sum_over_ranks,
)
from candle_dist.parallel.partition import Partition

VIRTUAL_INITS = ("text", "visual")
PHASES = ("train", "test")


@dataclass
class _Encoded:
    """Normalized rows (all ranks') and this rank's normalized columns, before/after fusion."""

    rows0: torch.Tensor
    text0: torch.Tensor
    rows: torch.Tensor
    text: torch.Tensor
    protos: torch.Tensor


class CandleHead(ClassShardedState, nn.Module):
    """Projections + fusion + prototypes; three logit sets (plain, visual-text, visual-visual).

    `text_features` [C, D] are every class's prompt features; `visual_prototypes` [C_base, D]
    the mean raw image feature of base classes 0..C_base-1. `logit_scale` is CLIP's log
    temperature (s = exp(logit_scale)); `visual_scale` scales the visual-visual logits. New
    classes (C_base..C-1) get learnable virtual prototypes initialized from their text features
    ("text") or the mean visual prototype plus N(0, 0.05^2) noise ("visual"). With "text" init
    and `tie_virtual_to_text`, a new class's text feature is its current virtual prototype
    (a constant in backward), as in the published code.
    """

    head_type = "candle"
    input_kind = "features"  # what it scores: the store's pooled image features

    def __init__(
        self,
        *,
        text_features: torch.Tensor,
        visual_prototypes: torch.Tensor,
        logit_scale: float | torch.Tensor,
        visual_scale: float = 1.0,
        mask: str = "none",
        virtual_init: str = "text",
        tie_virtual_to_text: bool = True,
        num_heads: int = 8,
        attn_dropout: float = 0.1,
        comm: ClassGroup | None = None,
        chunk_rows: int = 1024,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        text_features, visual_prototypes = _check_class_tensors(text_features, visual_prototypes)
        # Every tensor is made on `device` (default: the text features'), not moved there later:
        # construction is then the same code on every device, fake CUDA included (tests).
        device = torch.device(device) if device is not None else text_features.device
        if virtual_init not in VIRTUAL_INITS:
            raise UserInputError(
                f"unknown virtual_init {virtual_init!r}: choose one of {', '.join(VIRTUAL_INITS)}"
            )
        self.comm = comm or ClassGroup(distributed=False)
        num_classes, dim = text_features.shape
        num_base = visual_prototypes.shape[0]
        if num_classes < self.comm.world_size:
            raise UserInputError(
                f"{num_classes} classes cannot be split over {self.comm.world_size} ranks"
            )
        self.num_classes, self.num_base_classes, self.dim = num_classes, num_base, dim
        self.scale = math.exp(float(logit_scale))
        self.visual_scale = float(visual_scale)
        self.tied = tie_virtual_to_text and virtual_init == "text"
        self.chunk_rows = chunk_rows

        self.class_partition = Partition(num_classes, self.comm.world_size)
        start, stop = self.class_partition.range(self.comm.rank)
        self.class_start, self.class_stop = start, stop
        self.local_base = max(0, min(stop, num_base) - start)
        new_start = max(start, num_base)

        if virtual_init == "text":
            virtual = text_features[num_base:]
        else:
            noise = torch.randn(num_classes - num_base, dim, dtype=text_features.dtype) * 0.05
            virtual = visual_prototypes.mean(0, keepdim=True) + noise
        dtype = text_features.dtype
        self.register_buffer("text_features", text_features[start:stop].to(device, copy=True))
        local_protos = visual_prototypes[start : start + self.local_base]
        self.register_buffer("visual_prototypes", local_protos.to(device, copy=True))
        self.virtual_prototypes = nn.Parameter(
            virtual[new_start - num_base : max(stop, num_base) - num_base].to(device, copy=True)
        )
        self.proj_image = nn.Parameter(torch.eye(dim, dtype=dtype, device=device))
        self.proj_text = nn.Parameter(torch.eye(dim, dtype=dtype, device=device))
        self.fusion = Fusion(dim, num_heads, attn_dropout, mask, device=device, dtype=dtype)

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        image_features: torch.Tensor,
        phase: str = "train",
        image_sizes: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits0, logits_vt, logits_vv): rows = all ranks' images (+ one row per class in
        "train"), columns = this rank's classes (all classes with one process).

        `image_sizes` (every rank's image count) saves the all-gather and host sync that would
        find them."""
        enc = self._encode(image_features, phase, image_sizes=image_sizes)
        return (
            self.scale * enc.rows0 @ enc.text0.t(),
            self.scale * enc.rows @ enc.text.t(),
            self.scale * self.visual_scale * enc.rows @ enc.protos.t(),
        )

    def scores(
        self, image_features: torch.Tensor, image_sizes: list[int] | None = None
    ) -> torch.Tensor:
        """Test-phase scores `logits_vt + logits_vv` [all ranks' images, this rank's classes]."""
        _, logits_vt, logits_vv = self(image_features, phase="test", image_sizes=image_sizes)
        return logits_vt + logits_vv

    def loss(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        criterion: AdjustedCrossEntropy,
        classes: torch.Tensor | None = None,
        image_sizes: list[int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss `criterion(logits0) + criterion(logits_vt) + criterion(logits_vv)`.

        Rows are this step's images (all ranks') followed by one prototype row per class with
        targets 0..C-1. Logits exist one chunk of rows at a time (recomputed in backward).
        A criterion with `column_statistics` (LADE) adds each rank's share of its column term,
        computed from this rank's columns over all rows.

        Sampled mode: `classes` (sorted global ids within this rank's range, covering every
        class of the batch) restricts prototype rows, attention tokens and logit columns to
        those classes; the logit adjustment still comes from the full prior, and a column term
        covers the sampled classes only.

        `image_sizes`: every rank's image count, if known (see `forward`).
        """
        if criterion.num_classes != self.num_classes:
            raise UserInputError(
                f"the loss was built for {criterion.num_classes} classes but the head has "
                f"{self.num_classes}: pass class_counts for every class (base and new)"
            )
        device, sampled = labels.device, classes is not None
        if sampled:
            classes = classes.to(device)
            class_sizes = self.comm.sizes_of(classes.shape[0])
            all_classes = self.comm.gather_constant(classes, class_sizes)
        else:
            classes = torch.arange(self.class_start, self.class_stop, device=device)
            class_sizes = self.class_partition.sizes
            all_classes = torch.arange(self.num_classes, device=device)
        col_start = sum(class_sizes[: self.comm.rank])
        if image_sizes is None:
            image_sizes = self.comm.sizes_of(labels.shape[0])
        local_classes = classes - self.class_start if sampled else None
        enc = self._encode(image_features, "train", local_classes, image_sizes)
        image_labels = self.comm.gather_constant(labels, image_sizes)
        # logit columns are positions in `all_classes`; the criterion's reduction sees class ids
        targets = torch.cat([image_labels, all_classes])
        positions = torch.searchsorted(all_classes, targets) if sampled else targets
        adjustment = criterion.logit_adjustment
        if adjustment is not None:
            adjustment = adjustment.to(device)[classes]
        target_offset = criterion.target_offset(targets)

        def term(rows: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:
            return class_parallel_loss(
                criterion, rows, cols, scale, targets, positions, classes, adjustment,
                target_offset, col_start=col_start, comm=self.comm, chunk_rows=self.chunk_rows,
            )  # fmt: skip

        parts = {
            "loss0": term(enc.rows0, enc.text0, self.scale),
            "loss_vt": term(enc.rows, enc.text, self.scale),
            "loss_vv": term(enc.rows, enc.protos, self.scale * self.visual_scale),
        }
        total = parts["loss0"] + parts["loss_vt"] + parts["loss_vv"]
        return total, {name: value.detach() for name, value in parts.items()}

    def _encode(
        self,
        image_features: torch.Tensor,
        phase: str,
        local_classes: torch.Tensor | None = None,
        image_sizes: list[int] | None = None,
    ) -> _Encoded:
        if phase not in PHASES:
            raise UserInputError(f"unknown phase {phase!r}: use 'train' or 'test'")
        if image_features.ndim != 2 or image_features.shape[1] != self.dim:
            raise UserInputError(
                f"image features have shape {tuple(image_features.shape)}, expected [batch, "
                f"{self.dim}]: the image tower's dimension must match the text features'"
            )
        comm = self.comm
        if image_sizes is None:
            image_sizes = comm.sizes_of(image_features.shape[0])
        elif image_sizes[comm.rank] != image_features.shape[0]:
            raise ValueError(
                f"image_sizes {image_sizes} give rank {comm.rank} {image_sizes[comm.rank]} rows, "
                f"but it holds {image_features.shape[0]}"
            )
        image_features = image_features.to(self.proj_image.dtype)
        class_protos, class_texts = self.prototypes(), self.class_text_features()
        if local_classes is None:
            class_sizes = self.class_partition.sizes
        else:
            class_protos, class_texts = class_protos[local_classes], class_texts[local_classes]
            class_sizes = comm.sizes_of(local_classes.shape[0])

        images = image_features @ self.proj_image
        protos = class_protos @ self.proj_image
        texts = class_texts @ self.proj_text

        def rows_of(img: torch.Tensor, pro: torch.Tensor) -> torch.Tensor:
            rows = comm.gather_rows(F.normalize(img, dim=-1), image_sizes)
            if phase == "test":
                return rows
            return torch.cat([rows, comm.gather_rows(F.normalize(pro, dim=-1), class_sizes)])

        rows0 = rows_of(images, protos)
        text0 = F.normalize(texts, dim=-1)
        images, protos, texts = self.fusion(images, protos, texts, comm, image_sizes, class_sizes)
        return _Encoded(
            rows0=rows0,
            text0=text0,
            rows=rows_of(images, protos),
            text=F.normalize(texts, dim=-1),
            protos=F.normalize(protos, dim=-1),
        )

    # ------------------------------------------------------------------------ class tensors
    def prototypes(self) -> torch.Tensor:
        """This rank's prototypes: visual ones of base classes, then virtual ones of new classes."""
        return torch.cat([self.visual_prototypes, self.virtual_prototypes])

    def class_text_features(self) -> torch.Tensor:
        """This rank's text features, new classes' tied to their virtual prototypes if enabled."""
        if not self.tied:
            return self.text_features
        return torch.cat([self.text_features[: self.local_base], self.virtual_prototypes.detach()])

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], **options) -> CandleHead:
        """A head (one process unless `comm` is given) restored from a full state dict."""
        head = cls(
            text_features=state["text_features"],
            visual_prototypes=state["visual_prototypes"],
            **options,
        )
        head.load_full_state_dict(state)
        return head

    # --------------------------------------------------------------- sharded checkpoints
    def class_sharded_ranges(self) -> dict[str, tuple[int, list[int]]]:
        """For each class-sharded tensor: its full length and every rank's row count."""
        ranges = {}
        for name, offset, length in (
            ("text_features", 0, self.num_classes),
            ("visual_prototypes", 0, self.num_base_classes),
            ("virtual_prototypes", self.num_base_classes, self.num_classes - self.num_base_classes),
        ):
            sizes = []
            for rank in range(self.comm.world_size):
                start, stop = self.class_partition.range(rank)
                sizes.append(max(0, min(stop, offset + length) - max(start, offset)))
            ranges[name] = (length, sizes)
        return ranges

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tied:  # the published code's text_features share storage with the prototypes
            destination[prefix + "text_features"] = self.class_text_features().detach()


def class_parallel_loss(
    criterion: AdjustedCrossEntropy,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: float,
    targets: torch.Tensor,
    positions: torch.Tensor,
    classes: torch.Tensor,
    adjustment: torch.Tensor | None,
    target_offset: torch.Tensor | None,
    *,
    col_start: int,
    comm: ClassGroup,
    chunk_rows: int,
) -> torch.Tensor:
    """`criterion` of the logits `scale * rows @ cols^T (+ adjustment)`, rows = all ranks' rows,
    cols = this rank's classes `classes` (global ids) at logit positions from `col_start`;
    `targets` are class ids, `positions` their logit columns. Identical on every rank."""
    per_row = class_parallel_cross_entropy(
        rows,
        cols,
        scale,
        adjustment,
        positions,
        col_start=col_start,
        comm=comm,
        chunk_rows=chunk_rows,
        target_offset=target_offset,
    )
    value = criterion.reduce(per_row, targets)
    if criterion.column_statistics:
        column_lse, target_sums = class_parallel_column_statistics(
            rows, cols, scale, positions, col_start=col_start, chunk_rows=chunk_rows
        )
        share = criterion.column_term(column_lse, target_sums, targets, classes)
        value = value + sum_over_ranks(share, comm)
    return value


def _check_class_tensors(
    text_features: torch.Tensor, visual_prototypes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    text_features = torch.as_tensor(text_features)
    visual_prototypes = torch.as_tensor(visual_prototypes)
    if text_features.ndim != 2 or visual_prototypes.ndim != 2:
        raise UserInputError(
            "text_features must be [C, D] and visual_prototypes [C_base, D]; got shapes "
            f"{tuple(text_features.shape)} and {tuple(visual_prototypes.shape)}"
        )
    if text_features.shape[1] != visual_prototypes.shape[1]:
        raise UserInputError(
            f"text features have dimension {text_features.shape[1]} but image features / visual "
            f"prototypes have {visual_prototypes.shape[1]}: extract both with the same CLIP model"
        )
    if visual_prototypes.shape[0] > text_features.shape[0]:
        raise UserInputError(
            f"{visual_prototypes.shape[0]} visual prototypes for only {text_features.shape[0]} "
            "classes: every class (base and new) needs a text feature"
        )
    named = {"text_features": text_features, "visual_prototypes": visual_prototypes}
    for name, tensor in named.items():
        if not torch.isfinite(tensor).all():
            raise UserInputError(f"{name} contain NaN or infinite values: re-extract the features")
    if not text_features.is_floating_point():
        text_features = text_features.float()
    return text_features, visual_prototypes.to(text_features.dtype)
