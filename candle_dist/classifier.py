"""The exported Candle classifier: plain tensors + one formula, batch-independent predictions.

In the head's test forward, fusion runs over [batch images | prototypes | texts], so for every
mask mode an image's scores depend on the other images of its batch (through the class tokens,
which attend to image tokens, and, except in `in_visual`, directly). The export removes that
dependence: the class tokens are fused once without any image ("a batch of zero"), their keys
and values are cached, and each image token attends to itself plus the class tokens its mask
mode allows. A prediction then depends on its own image only, and costs O(C x D). The export
also keeps the unfused class inputs (CLASS_INPUTS), from which `class_tokens` fuses the class
tokens again when classes are added by name (`candle-dist add-classes`, candle_dist/grow.py).

This module needs only torch, safetensors (for export directories) and the plain-Python
provenance record: an exported classifier loads without the training code, from a run's
final/classifier.pt or from a directory written by `candle-dist export` (model.safetensors,
config.json, classnames.txt: no pickle).

    clf = load("runs/x/final/classifier.pt")    # or load("exports/x"), an export directory
    scores = clf.scores(image_features)          # [N, C]
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from candle_dist.provenance import classes_sha256, provenance

FORMAT = "candle_dist.classifier/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CLASSNAMES_FILE = "classnames.txt"
# the trained parameters an image token passes through (projection, LayerNorm, attention, ratio)
IMAGE_PARAMS = (
    "proj_image",
    "norm_weight",
    "norm_bias",
    "in_proj_weight",
    "in_proj_bias",
    "out_proj_weight",
    "out_proj_bias",
    "ratio",
)
# the tensors and the scalar fields the scoring formula reads
TENSORS = (*IMAGE_PARAMS, "class_keys", "class_values", "text_columns", "proto_columns")
SCALARS = ("num_base_classes", "num_heads", "scale", "visual_scale", "mask", "norm_eps")


# the unfused class inputs and the text projection, from which `class_tokens` recomputes the
# class tokens when classes are added (candle_dist/grow.py); scoring does not read them
CLASS_INPUTS = ("proj_text", "class_prototypes", "class_texts")
# the trained parameters `class_tokens` reads, besides num_heads and mask
FUSION_PARAMS = (*IMAGE_PARAMS, "proj_text")


@torch.no_grad()
def class_tokens(
    prototypes: torch.Tensor,
    texts: torch.Tensor,
    params: dict[str, Any],
    num_heads: int,
    mask: str,
) -> dict[str, torch.Tensor]:
    """class_keys, class_values, text_columns and proto_columns of raw class prototypes and
    texts [C, D] under the trained `params` (FUSION_PARAMS and norm_eps): the class tokens
    fused without any image, one computation for export and for added classes.

    The fusion is the head's own module (candle_dist/model/fusion.py, imported here only), so
    that its mask table has one implementation."""
    from candle_dist.model.fusion import Fusion

    dim, dtype = params["proj_image"].shape[1], params["proj_image"].dtype
    fusion = Fusion(dim, num_heads, 0.0, mask, device=prototypes.device, dtype=dtype).eval()
    fusion.norm.weight.copy_(params["norm_weight"])
    fusion.norm.bias.copy_(params["norm_bias"])
    fusion.norm.eps = float(params["norm_eps"])
    fusion.attn.in_proj_weight.copy_(params["in_proj_weight"])
    fusion.attn.in_proj_bias.copy_(params["in_proj_bias"])
    fusion.attn.out_proj.weight.copy_(params["out_proj_weight"])
    fusion.attn.out_proj.bias.copy_(params["out_proj_bias"])
    fusion.ratio.copy_(params["ratio"])
    protos = prototypes.to(dtype) @ params["proj_image"]
    texts = texts.to(dtype) @ params["proj_text"]
    empty = protos.new_zeros(0, dim)
    _, fused_protos, fused_texts = fusion(empty, protos, texts)
    normed = fusion.norm(torch.cat([protos, texts]))
    _, k, v = F.linear(normed, fusion.attn.in_proj_weight, fusion.attn.in_proj_bias).chunk(3, -1)
    num_cls = protos.shape[0]
    # the class keys an image query sees (its own key is added by Scorer where the mode has it)
    allowed = {
        "none": (0, 2 * num_cls),
        "in_visual": (num_cls, 2 * num_cls),
        "in_text": (0, 2 * num_cls),
        "between_visual_text": (0, num_cls),
    }
    lo, hi = allowed[mask]
    return {
        "class_keys": k[lo:hi].cpu(),
        "class_values": v[lo:hi].cpu(),
        "text_columns": F.normalize(fused_texts, dim=-1).cpu(),
        "proto_columns": F.normalize(fused_protos, dim=-1).cpu(),
    }


@torch.no_grad()
def classifier_state(
    head, classnames: list[str], record: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The exported classifier of a one-process `CandleHead` as a state dict (see
    `export_classifier`)."""
    head = head.eval()
    fusion = head.fusion
    params = {
        "proj_image": head.proj_image,
        "proj_text": head.proj_text,
        "norm_weight": fusion.norm.weight,
        "norm_bias": fusion.norm.bias,
        "in_proj_weight": fusion.attn.in_proj_weight,
        "in_proj_bias": fusion.attn.in_proj_bias,
        "out_proj_weight": fusion.attn.out_proj.weight,
        "out_proj_bias": fusion.attn.out_proj.bias,
        "ratio": fusion.ratio,
    }
    prototypes, texts = head.prototypes(), head.class_text_features()
    params = {name: value.detach() for name, value in params.items()}
    tokens = class_tokens(
        prototypes, texts, {**params, "norm_eps": fusion.norm.eps}, fusion.num_heads, fusion.mask
    )
    return {
        "format": FORMAT,
        "classnames": list(classnames),
        "provenance": record,
        "num_base_classes": head.num_base_classes,
        "num_heads": fusion.num_heads,
        "scale": head.scale,
        "visual_scale": head.visual_scale,
        "mask": fusion.mask,
        "norm_eps": fusion.norm.eps,
        **{name: value.cpu() for name, value in params.items()},
        "class_prototypes": prototypes.detach().cpu(),
        "class_texts": texts.detach().cpu(),
        **tokens,
    }


def export_classifier(
    head,
    path: str | os.PathLike,
    classnames: list[str],
    record: dict[str, Any] | None = None,
) -> None:
    """Write the batch-independent classifier of a one-process `CandleHead` (atomically), with
    `record`, the provenance of its training features (candle_dist.provenance), which predict
    compares with the features it is given. Besides the scoring tensors it keeps the raw class
    inputs (CLASS_INPUTS), so that classes can be added later without retraining."""
    state = classifier_state(head, classnames, record)
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Scorer(nn.Module):
    """The scoring formula as a module, so that `ExportedClassifier.scores` and the ONNX graph
    `candle-dist export` traces from it are one implementation."""

    def __init__(self, state: dict[str, Any]):
        super().__init__()
        for name in TENSORS:
            self.register_buffer(name, state[name])
        self.num_heads = int(state["num_heads"])
        self.scale = float(state["scale"])
        self.visual_scale = float(state["visual_scale"])
        self.norm_eps = float(state["norm_eps"])
        self.embed_dim = int(state["proj_image"].shape[1])  # a constant in traced (ONNX) graphs

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """[N, C] scores of [N, D] image features; row i depends on image i only."""
        x = image_features.to(self.proj_image.dtype) @ self.proj_image
        normed = F.layer_norm(x, (self.embed_dim,), self.norm_weight, self.norm_bias, self.norm_eps)
        q, k_self, v_self = F.linear(normed, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)

        def split(t: torch.Tensor) -> torch.Tensor:  # [n, D] -> [H, n, d]
            return t.reshape(t.shape[0], self.num_heads, -1).transpose(0, 1)

        q, k_self, v_self = split(q), split(k_self), split(v_self)
        keys, values = split(self.class_keys), split(self.class_values)
        scale = 1.0 / math.sqrt(self.embed_dim // self.num_heads)
        own = (q * k_self).sum(-1, keepdim=True) * scale
        weights = torch.softmax(torch.cat([own, q @ keys.transpose(1, 2) * scale], -1), -1)
        attended = weights[..., :1] * v_self + weights[..., 1:] @ values
        attended = attended.transpose(0, 1).reshape(x.shape)
        fused = normed + self.ratio * F.linear(attended, self.out_proj_weight, self.out_proj_bias)
        rows = F.normalize(fused, dim=-1)
        scores = self.scale * rows @ self.text_columns.t()
        return scores + self.scale * self.visual_scale * rows @ self.proto_columns.t()


class ExportedClassifier:
    """Scores = s * n(x') . n(T')^T + s_v * n(x') . n(P')^T with x' the fused image token."""

    def __init__(self, state: dict):
        self.state = state
        self.classnames: list[str] = list(state["classnames"])
        self.num_base_classes = int(state["num_base_classes"])
        self.scorer = Scorer(state)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> ExportedClassifier:
        """The classifier in `path`, a classifier.pt file or an export directory (a run's final/
        is read through its classifier.pt); a ValueError saying what is wrong otherwise."""
        path = Path(path)
        if path.is_dir():
            if (path / "classifier.pt").is_file() and not (path / MODEL_FILE).exists():
                path = path / "classifier.pt"
            else:
                return cls(_read_directory(path, device))
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise ValueError(
                f"{path} does not exist: pass the final/ directory of a finished training run"
            ) from None
        except Exception as err:  # truncated or foreign: torch raises many types
            raise ValueError(
                f"{path} cannot be loaded ({str(err).splitlines()[0]}): the file is damaged; "
                "rerun `candle-dist train --resume` with the run's config (a finished run only "
                "writes final/ again)"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not an exported candle_dist classifier: export one with "
                "`candle-dist predict --checkpoint RUN/final` or export_classifier()"
            )
        return cls(state)

    @property
    def dim(self) -> int:
        return int(self.state["proj_image"].shape[0])

    @property
    def provenance(self) -> dict[str, Any]:
        """What the training features were made from (classifiers exported before it was
        recorded: the class list and dimension only)."""
        recorded = self.state.get("provenance")
        if recorded:
            return recorded
        return provenance(
            self.classnames, model=None, pretrained=None, templates=None, dim=self.dim
        )

    @torch.no_grad()
    def scores(self, image_features: torch.Tensor, columns: str = "all") -> torch.Tensor:
        """[N, C] scores (or the base / new column block); row i depends on image i only."""
        scores = self.scorer(image_features)
        if columns == "base":
            return scores[:, : self.num_base_classes]
        if columns == "new":
            return scores[:, self.num_base_classes :]
        return scores

    @torch.no_grad()
    def predictions(self, image_features: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """Per image, its k best classes as {"id", "class", "score", "prob"}: `prob` is the
        softmax of the scores over all classes at temperature 1 (the scores are the logits the
        head was trained with, CLIP's scale included)."""
        scores = self.scores(image_features).float()
        probs = torch.softmax(scores, dim=-1)
        values, indices = scores.topk(min(k, len(self.classnames)), dim=-1)
        chosen = probs.gather(1, indices)
        return [
            [
                {"id": i, "class": self.classnames[i], "score": round(v, 4), "prob": round(q, 6)}
                for v, i, q in zip(vals, idx, qs, strict=True)
            ]
            for vals, idx, qs in zip(
                values.tolist(), indices.tolist(), chosen.tolist(), strict=True
            )
        ]

    def topk(self, image_features: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        values, indices = self.scores(image_features).topk(min(k, len(self.classnames)), dim=-1)
        return [
            [(self.classnames[i], float(v)) for v, i in zip(vals, idx, strict=True)]
            for vals, idx in zip(values.tolist(), indices.tolist(), strict=True)
        ]


def write_directory(
    classifier: ExportedClassifier, folder: str | os.PathLike, clip: dict[str, Any]
) -> None:
    """`classifier` as model.safetensors (its tensors), config.json (its other fields, its
    dimensions, `clip`: the CLIP its features come from) and classnames.txt in the existing
    `folder`: files any language reads, with no pickle to trust."""
    from safetensors.torch import save

    folder = Path(folder)
    state = classifier.state
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if _is_tensor(v)}
    (folder / MODEL_FILE).write_bytes(save(tensors, metadata={"format": FORMAT}))
    fields = {k: v for k, v in state.items() if not _is_tensor(v) and k != "classnames"}
    config = {
        **fields,
        "dim": classifier.dim,
        "embed_dim": int(state["proj_image"].shape[1]),
        "num_classes": len(classifier.classnames),
        "clip": clip,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (folder / CLASSNAMES_FILE).write_text(
        "".join(f"{name}\n" for name in classifier.classnames), encoding="utf-8"
    )


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of an export directory; a ValueError saying what is wrong otherwise."""
    file = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} cannot be read ({err}): {_REEXPORT}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{file} is not the config of an exported classifier: {_REEXPORT}")
    return config


_REEXPORT = "export the run again with `candle-dist export RUN/final --output DIR`"


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _read_directory(folder: Path, device: str) -> dict[str, Any]:
    """The classifier state of an export directory, checked against its own config."""
    from safetensors.torch import load_file

    missing = [n for n in (MODEL_FILE, CONFIG_FILE, CLASSNAMES_FILE) if not (folder / n).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not an exported classifier ({', '.join(missing)} missing): pass a "
            f"directory written by `candle-dist export`, a run's final/ or its classifier.pt"
        )
    config = read_config(folder)
    try:
        tensors = load_file(folder / MODEL_FILE, device=device)
    except Exception as err:  # truncated or foreign: safetensors raises several types
        raise ValueError(
            f"{folder / MODEL_FILE} cannot be loaded ({str(err).splitlines()[0]}): {_REEXPORT}"
        ) from None
    text = (folder / CLASSNAMES_FILE).read_text(encoding="utf-8")
    classnames = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    absent = [k for k in (*TENSORS, *SCALARS) if k not in tensors and k not in config]
    if absent:
        raise ValueError(f"{folder} lacks {', '.join(absent)}: {_REEXPORT}")
    recorded = (config.get("provenance") or {}).get("classes_sha256")
    if len(classnames) != config.get("num_classes") or recorded not in (
        None,
        classes_sha256(classnames),
    ):
        raise ValueError(
            f"{folder / CLASSNAMES_FILE} is not the class list the classifier was exported with "
            f"({len(classnames)} names, edited?): {_REEXPORT}"
        )
    fields = {k: v for k, v in config.items() if k not in ("dim", "embed_dim", "num_classes")}
    return {**fields, **tensors, "classnames": classnames}


def load(path: str | os.PathLike, device: str = "cpu") -> ExportedClassifier:
    """The exported classifier at `path` (a run's final/classifier.pt, or a directory written by
    `candle-dist export`), on `device`."""
    return ExportedClassifier.load(path, device)
