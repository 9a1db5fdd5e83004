"""What the trainer consumes: features, labels, class texts and counts, from a store or memory."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from candle_dist import provenance as prov
from candle_dist.errors import UserInputError

DEFAULT_LOGIT_SCALE = math.log(100.0)  # OpenAI CLIP's learned temperature, s = 100


# what the training store says of the CLIP that made it, kept in checkpoints for predict
CLIP_FIELDS = ("model", "pretrained", "model_config", "dim", "precision")


@dataclass
class TrainingData:
    """Training split. `features` is any [N, D] array indexable by an int array (memory-mapped
    stores included); `views(indices, view_ids)` gives augmented views when `num_views` > 0;
    `tokens` is an [N, T, W] array of image token states (stores extracted with --tokens) and
    `token_projection` the (matrix [W, D], bias [D]) mapping token 0 to the features' space."""

    features: Any
    labels: np.ndarray
    text_features: torch.Tensor
    counts: np.ndarray
    num_base_classes: int
    classnames: list[str]
    logit_scale: float = DEFAULT_LOGIT_SCALE
    num_views: int = 0
    views: Any = None
    source: str = "memory"
    clip: dict[str, Any] | None = None  # the CLIP that made the features (model, pretrained, ...)
    # what the features were made from (candle_dist.provenance); default: the class list, the
    # text features' dimension and `clip`
    provenance: dict[str, Any] | None = None
    tokens: Any = None
    token_projection: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.provenance is None:
            clip = self.clip or {}
            self.provenance = prov.provenance(
                self.classnames,
                model=clip.get("model"),
                pretrained=clip.get("pretrained"),
                templates=None,
                dim=int(self.text_features.shape[1]),
            )

    @property
    def num_classes(self) -> int:
        return int(self.text_features.shape[0])

    def rows(self, indices: np.ndarray, view_ids: np.ndarray | None = None) -> torch.Tensor:
        """Float32 feature rows for these sample indices (one augmented view each if given)."""
        if view_ids is not None and self.num_views > 0:
            rows = self.views(indices, view_ids)
        else:
            rows = self.features[indices]
        return torch.as_tensor(np.asarray(rows, dtype=np.float32))

    def token_rows(self, indices: np.ndarray) -> torch.Tensor:
        """Float32 token rows [n, T, W] for these sample indices."""
        tokens = require_tokens(self.tokens, self.source)
        return torch.as_tensor(np.asarray(tokens[indices], dtype=np.float32))


def require_tokens(tokens: Any, source: str) -> Any:
    """A store's token features, or the error that says how to make them."""
    if tokens is None:
        raise UserInputError(
            f"{source}: no token features; extract the store with `candle-dist extract --tokens` "
            "(--token-grid 7 keeps 50 tokens per image): head.type=decoder reads them"
        )
    return tokens


@dataclass
class EvalData:
    features: Any
    labels: np.ndarray
    source: str = "memory"
    provenance: dict[str, Any] | None = None  # None: not recorded, not compared
    tokens: Any = None  # [N, T, W] token states, when the store has them


def training_data_from_synthetic(synthetic) -> tuple[TrainingData, EvalData]:
    """Wrap `candle_dist.data.synthetic_features.SyntheticFeatures` for the trainer."""
    train = TrainingData(
        features=synthetic.train_features.numpy(),
        labels=synthetic.train_labels.numpy(),
        text_features=synthetic.text_features,
        counts=synthetic.counts.numpy(),
        num_base_classes=synthetic.num_base_classes,
        classnames=list(synthetic.classnames),
        logit_scale=float(synthetic.logit_scale),
        source="synthetic",
    )
    val = EvalData(synthetic.val_features.numpy(), synthetic.val_labels.numpy(), "synthetic")
    return train, val


def training_data_from_store(path: str) -> TrainingData:
    """Open a feature store written by `candle-dist extract` (memory-mapped)."""
    from candle_dist.features.store import FeatureStore

    store = FeatureStore(path)
    return TrainingData(
        features=store.features,
        labels=np.asarray(store.labels, dtype=np.int64),
        text_features=torch.as_tensor(np.asarray(store.text_features, dtype=np.float32)),
        counts=np.asarray(store.counts, dtype=np.int64),
        num_base_classes=int(store.num_base_classes),
        classnames=list(store.classnames),
        logit_scale=float(store.manifest.get("logit_scale") or DEFAULT_LOGIT_SCALE),
        num_views=int(store.num_views),
        views=store.views if store.num_views else None,
        source=str(path),
        clip={k: store.manifest.get(k) for k in CLIP_FIELDS},
        provenance=store_provenance(store),
        tokens=store.tokens,
        token_projection=store.token_projection,
    )


def eval_data_from_store(path: str) -> EvalData:
    from candle_dist.features.store import FeatureStore

    store = FeatureStore(path)
    labels = np.asarray(store.labels, dtype=np.int64)
    return EvalData(store.features, labels, str(path), store_provenance(store), store.tokens)


def store_provenance(store) -> dict[str, Any]:
    """The provenance a feature store recorded, else (stores written before it was recorded)
    the one its class list and manifest give."""
    recorded = getattr(store, "provenance", None)
    if recorded:
        return dict(recorded)
    manifest = store.manifest
    return prov.provenance(
        store.classnames,
        model=manifest.get("model"),
        pretrained=manifest.get("pretrained"),
        templates=manifest.get("templates"),
        dim=manifest.get("dim"),
    )


def validate(train: TrainingData, val: EvalData | None = None, chunk: int = 65536) -> None:
    """Reject what would otherwise fail deep inside torch, or train on garbage silently."""
    if val is not None and val.provenance is not None:
        prov.check_same(
            train.provenance,
            val.provenance,
            f"training store {train.source}",
            f"validation store {val.source}",
            fix="extract data.val with the class list (classnames.txt) and CLIP of data.train",
        )
    num_classes, dim = train.text_features.shape
    if len(train.counts) != num_classes:
        raise UserInputError(
            f"{train.source}: counts has {len(train.counts)} entries but there are {num_classes} "
            "classes (text features): counts.tsv and classnames.txt must list the same classes"
        )
    if len(train.labels) != len(train.features):
        raise UserInputError(
            f"{train.source}: {len(train.features)} feature rows but {len(train.labels)} labels"
        )
    for split in [train, *([val] if val is not None else [])]:
        labels = np.asarray(split.labels)
        if split.tokens is not None and len(split.tokens) != len(labels):
            raise UserInputError(
                f"{split.source}: {len(split.tokens)} token rows but {len(labels)} labels; "
                "re-extract the store"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
            raise UserInputError(
                f"{split.source}: label {bad} is outside [0, {num_classes}); the class list has "
                f"{num_classes} classes: use the classnames.txt the shards were made with"
            )
        if len(split.features) and np.asarray(split.features[:1]).shape[-1] != dim:
            raise UserInputError(
                f"{split.source}: image features have dimension "
                f"{np.asarray(split.features[:1]).shape[-1]} but text features have {dim}: "
                "extract both with the same CLIP model"
            )
        for start in range(0, len(split.features), chunk):
            block = np.asarray(split.features[start : start + chunk], dtype=np.float32)
            if not np.isfinite(block).all():
                row = start + int(np.argwhere(~np.isfinite(block))[0][0])
                raise UserInputError(
                    f"{split.source}: feature row {row} contains NaN or infinity: re-extract it"
                )
    if not torch.isfinite(train.text_features).all():
        raise UserInputError(f"{train.source}: text features contain NaN or infinity")
    present = np.bincount(np.asarray(train.labels), minlength=num_classes)[: train.num_base_classes]
    if (present == 0).any():
        missing = np.flatnonzero(present == 0)
        names = ", ".join(f"{i} ({train.classnames[i]})" for i in missing[:5])
        raise UserInputError(
            f"{train.source}: base class(es) {names} have no training images; base classes "
            "(ids < num_base_classes) need images: mark them as new classes or add images"
        )
