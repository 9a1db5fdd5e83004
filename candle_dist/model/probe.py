"""Classifier heads of the baseline family: a linear probe or the token decoder, then a
class-parallel linear classifier, optionally calibrated by a second stage (docs/baselines.md).

Scores are `z_c = f . w_c + b_c` with f the L2-normalized image embedding (the pooled CLIP
feature for `linear`, the decoder's output for `decoder`). The C x D classifier is split over
ranks by class, like the Candle head's prototypes, and trained with the same chunked
class-parallel cross-entropy; the decoder blocks are replicated. `init="text"` starts the rows at
`s * t_c` (t_c the class's normalized text feature, s = exp(logit_scale)): the zero-shot
classifier. `init="random"` starts them at random directions of the same norm.

Second-stage calibrations keep the representation and the classifier frozen and learn, per class:
- `lws`: a scale, `s_c z_c` (Kang et al., "Decoupling Representation and Classifier");
- `marc`: `a_c z_c + b_c ||w_c||` (Wang et al., "Margin Calibration");
- `disalign`: `(1 - g) z_c + g (alpha_c z_c + beta_c)` with a gate `g = sigmoid(v . f + u)`
  on the embedding (Zhang et al., "Distribution Alignment").
Each is the identity at the start. `crt` re-initializes and re-trains the classifier itself.
All of them are exact affine maps of [f, 1] (disalign: of [f, 1, g f, g]), so scores and losses
stay one matmul of rows by this rank's class columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from candle_dist.errors import UserInputError
from candle_dist.model.decoder import TokenDecoder
from candle_dist.model.head import class_parallel_loss
from candle_dist.model.losses import AdjustedCrossEntropy
from candle_dist.model.sharded_state import ClassShardedState
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.partition import Partition

PROBE_TYPES = ("linear", "decoder")
CLASSIFIER_INITS = ("text", "random")
CALIBRATIONS = ("none", "lws", "marc", "disalign")
# class-sharded parameters of each calibration (one value per class), and their start
_CALIBRATION_PARAMS = {
    "none": {},
    "lws": {"class_scale": 1.0},
    "marc": {"marc_scale": 1.0, "marc_bias": 0.0},
    "disalign": {"align_scale": 1.0, "align_bias": 0.0},
}


class ProbeHead(ClassShardedState, nn.Module):
    """A linear probe (`head_type="linear"`, on pooled features [n, D]) or the token decoder
    (`"decoder"`, on tokens [n, T, W]) followed by a class-parallel linear classifier.

    `text_features` [C, D] give the class count, the dimension and (init "text") the classifier's
    start; `token_width` and `token_projection` configure the decoder (TokenDecoder).
    """

    def __init__(
        self,
        *,
        head_type: str,
        text_features: torch.Tensor,
        logit_scale: float,
        init: str = "text",
        calibration: str = "none",
        token_width: int | None = None,
        token_projection: tuple[torch.Tensor, torch.Tensor] | None = None,
        depth: int = 3,
        decoder_heads: int = 4,
        mlp_ratio: float = 0.5,
        seed: int = 0,
        comm: ClassGroup | None = None,
        chunk_rows: int = 1024,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("head.type", head_type, PROBE_TYPES),
            ("head.init", init, CLASSIFIER_INITS),
            ("calibration", calibration, CALIBRATIONS),
        ):
            if value not in choices:
                names = ", ".join(choices)
                raise UserInputError(f"unknown {name}={value!r}: choose one of {names}")
        self._options = {
            "head_type": head_type,
            "logit_scale": float(logit_scale),
            "init": init,
            "calibration": calibration,
            "token_width": token_width,
            "depth": depth,
            "decoder_heads": decoder_heads,
            "mlp_ratio": mlp_ratio,
            "seed": seed,
            "chunk_rows": chunk_rows,
        }
        text_features = torch.as_tensor(text_features, dtype=torch.float32)
        device = torch.device(device) if device is not None else text_features.device
        self.head_type, self.init, self.calibration = head_type, init, calibration
        self.input_kind = "tokens" if head_type == "decoder" else "features"
        self.comm = comm or ClassGroup(distributed=False)
        self.num_classes, self.dim = text_features.shape
        if self.num_classes < self.comm.world_size:
            raise UserInputError(
                f"{self.num_classes} classes cannot be split over {self.comm.world_size} ranks"
            )
        self.scale = math.exp(float(logit_scale))
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.class_partition = Partition(self.num_classes, self.comm.world_size)
        self.class_start, self.class_stop = self.class_partition.range(self.comm.rank)
        self.decoder = None
        if head_type == "decoder":
            if token_width is None:
                raise UserInputError("head.type=decoder needs the token width of the store")
            self.decoder = TokenDecoder(
                token_width,
                self.dim,
                depth=depth,
                heads=decoder_heads,
                mlp_ratio=mlp_ratio,
                projection=token_projection,
                device=device,
            )
        local = self.class_stop - self.class_start
        self.weight = nn.Parameter(torch.empty(local, self.dim, device=device))
        self.bias = nn.Parameter(torch.zeros(local, device=device))
        self.reset_classifier(text_features)
        for name, start in _CALIBRATION_PARAMS[calibration].items():
            self.register_parameter(name, nn.Parameter(torch.full((local,), start, device=device)))
        self.gate = nn.Linear(self.dim, 1, device=device) if calibration == "disalign" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    @torch.no_grad()
    def reset_classifier(self, text_features: torch.Tensor) -> None:
        """Classifier rows at their start (per `init`) and zero bias; the random rows come from
        `seed` over all classes, so every rank count starts from the same classifier."""
        if self.init == "text":
            rows = text_features
        else:
            generator = torch.Generator().manual_seed(self.seed)
            rows = torch.randn(self.num_classes, self.dim, generator=generator)
        rows = self.scale * F.normalize(rows.float(), dim=-1)
        self.weight.copy_(rows[self.class_start : self.class_stop])
        self.bias.zero_()

    def freeze_representation(self, train_classifier: bool) -> None:
        """Second stage: the decoder (and, unless `train_classifier`, the classifier) frozen."""
        frozen = [] if self.decoder is None else list(self.decoder.parameters())
        if not train_classifier:
            frozen += [self.weight, self.bias]
        for param in frozen:
            param.requires_grad_(False)

    # ------------------------------------------------------------------------------ scoring
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """The normalized embedding f [n, D] of pooled features [n, D] or tokens [n, T, W]."""
        expected = (3, "[batch, tokens, width]") if self.decoder else (2, f"[batch, {self.dim}]")
        if inputs.ndim != expected[0]:
            raise UserInputError(
                f"{self.head_type} head: inputs have shape {tuple(inputs.shape)}, expected "
                f"{expected[1]}"
            )
        if self.decoder is not None:
            if inputs.shape[-1] != self.decoder.width:
                raise UserInputError(
                    f"tokens have width {inputs.shape[-1]} but the decoder was built for "
                    f"{self.decoder.width}: use tokens extracted with the same CLIP"
                )
            inputs = self.decoder(inputs)
        elif inputs.shape[1] != self.dim:
            raise UserInputError(
                f"features have dimension {inputs.shape[1]} but the classifier has {self.dim}: "
                "extract with the CLIP the head was trained on"
            )
        return F.normalize(inputs.to(self.weight.dtype), dim=-1)

    def rows_and_columns(self, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [n, K], this rank's columns [C_local, K]) with rows @ columns^T = the
        calibrated scores: the bias and calibration folded in as extra dimensions."""
        ones = embedded.new_ones(embedded.shape[0], 1)
        w, b = self.weight, self.bias
        if self.calibration == "lws":
            s = self.class_scale
            return torch.cat([embedded, ones], 1), torch.cat([s[:, None] * w, (s * b)[:, None]], 1)
        if self.calibration == "marc":
            a, beta = self.marc_scale, self.marc_bias
            bias = a * b + beta * w.norm(dim=1)
            return torch.cat([embedded, ones], 1), torch.cat([a[:, None] * w, bias[:, None]], 1)
        if self.calibration == "disalign":
            g = torch.sigmoid(self.gate(embedded))
            rows = torch.cat([embedded, ones, g * embedded, g], 1)
            shift = self.align_scale - 1.0
            extra = [shift[:, None] * w, (shift * b + self.align_bias)[:, None]]
            return rows, torch.cat([w, b[:, None], *extra], 1)
        return torch.cat([embedded, ones], 1), torch.cat([w, b[:, None]], 1)

    def scores(self, inputs: torch.Tensor, image_sizes: list[int] | None = None) -> torch.Tensor:
        """Scores [all ranks' images, this rank's classes] (float32)."""
        rows, cols = self.rows_and_columns(self.embed(inputs))
        sizes = image_sizes or self.comm.sizes_of(rows.shape[0])
        rows = self.comm.gather_constant(rows, sizes)
        return (rows.float() @ cols.float().t()).float()

    def loss(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        criterion: AdjustedCrossEntropy,
        classes: torch.Tensor | None = None,
        image_sizes: list[int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`criterion` over all ranks' images of this step, chunked and class-parallel."""
        if classes is not None:
            raise UserInputError(
                f"train.class_sample_fraction is for the candle head; the {self.head_type} head "
                "trains on every class (set it to 0)"
            )
        if criterion.num_classes != self.num_classes:
            raise UserInputError(
                f"the loss was built for {criterion.num_classes} classes but the head has "
                f"{self.num_classes}"
            )
        device = labels.device
        sizes = image_sizes or self.comm.sizes_of(labels.shape[0])
        rows, cols = self.rows_and_columns(self.embed(inputs))
        rows = self.comm.gather_rows(rows, sizes)
        targets = self.comm.gather_constant(labels, sizes)
        classes = torch.arange(self.class_start, self.class_stop, device=device)
        adjustment = criterion.logit_adjustment
        if adjustment is not None:
            adjustment = adjustment.to(device)[classes]
        value = class_parallel_loss(
            criterion, rows, cols, 1.0, targets, targets, classes, adjustment,
            criterion.target_offset(targets), col_start=self.class_start, comm=self.comm,
            chunk_rows=self.chunk_rows,
        )  # fmt: skip
        return value, {}

    @torch.no_grad()
    def tau_normalize(self, tau: float) -> None:
        """Post-hoc tau-normalization (Kang et al.): each class's weight row and bias divided by
        ||w_c||^tau; tau = 0 leaves the classifier as it is, 1 makes every row unit-norm."""
        factor = self.weight.norm(dim=1).clamp_min(1e-12).pow(-tau)
        self.weight.mul_(factor[:, None])
        self.bias.mul_(factor)

    # --------------------------------------------------------------------------- state
    def class_sharded_ranges(self) -> dict[str, tuple[int, list[int]]]:
        sizes = self.class_partition.sizes
        names = ("weight", "bias", *_CALIBRATION_PARAMS[self.calibration])
        return {name: (self.num_classes, sizes) for name in names}

    def options(self) -> dict[str, object]:
        """The constructor's keyword arguments besides the tensors, comm and device (what
        head_meta.json records, and `from_state_dict` takes back)."""
        return dict(self._options)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], **options) -> ProbeHead:
        """A head (one process unless `comm` is given) restored from a full state dict."""
        placeholder = torch.zeros(tuple(state["weight"].shape))
        head = cls(text_features=placeholder, **options)
        head.load_full_state_dict(state)
        return head
