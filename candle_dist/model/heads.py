"""Which head a run trains (`head.type`), built from a config and its training data, and a
trained head loaded back from a run's final/ (or best/) folder.

- `candle`: the Candle prototype head (docs/method.md), on pooled features;
- `decoder`: the token decoder and a class-parallel classifier (docs/baselines.md), on the
  store's token features (`candle-dist extract --tokens`);
- `linear`: a linear probe on pooled features.
`stage2.from` starts a decoder/linear run from another run's trained head, with the
representation frozen and `stage2.method` training the classifier (crt) or a calibration of it
(lws, disalign, marc).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from candle_dist import provenance as prov
from candle_dist.errors import UserInputError
from candle_dist.model.head import CandleHead
from candle_dist.model.probe import CLASSIFIER_INITS, PROBE_TYPES, ProbeHead
from candle_dist.parallel.comm import ClassGroup
from candle_dist.train.data import require_tokens
from candle_dist.train.prototypes import class_means

HEAD_TYPES = ("candle", *PROBE_TYPES)
STAGE2_METHODS = ("crt", "lws", "disalign", "marc")
# what head_meta.json must hold for a head to load back
META_KEYS = ("classnames", "num_base_classes", "counts", "head_options")

__all__ = ["CLASSIFIER_INITS", "HEAD_TYPES", "STAGE2_METHODS", "build_head", "load_head"]


def candle_options(cfg, logit_scale: float) -> dict[str, Any]:
    """CandleHead keyword arguments of a config (without the class tensors)."""
    return {
        "logit_scale": logit_scale,
        "visual_scale": cfg.head.visual_scale,
        "mask": cfg.head.mask,
        "virtual_init": cfg.head.virtual_init,
        "tie_virtual_to_text": cfg.head.tie_virtual_to_text,
        "num_heads": cfg.head.num_heads,
        "attn_dropout": cfg.head.attn_dropout,
        "chunk_rows": cfg.head.chunk_rows,
    }


def build_head(cfg, train, comm: ClassGroup, device=None) -> CandleHead | ProbeHead:
    """The head `cfg` asks for, at its start, on `device` (`train`: TrainingData)."""
    logit_scale = cfg.head.logit_scale if cfg.head.logit_scale is not None else train.logit_scale
    torch.manual_seed(cfg.train.seed)  # random starts: the same on every rank
    if cfg.stage2.source:
        return _stage2_head(cfg, train, comm, device)
    if cfg.head.type == "candle":
        protos = class_means(train.features, train.labels, train.num_base_classes)
        return CandleHead(
            text_features=train.text_features,
            visual_prototypes=protos,
            comm=comm,
            device=device,
            **candle_options(cfg, logit_scale),
        )
    if cfg.train.class_sample_fraction > 0:
        raise UserInputError(
            f"train.class_sample_fraction={cfg.train.class_sample_fraction} is for the candle "
            f"head; head.type={cfg.head.type} trains on every class: set it to 0"
        )
    token_width, projection = None, None
    if cfg.head.type == "decoder":
        tokens = require_tokens(train.tokens, train.source)
        token_width = int(tokens.shape[-1])
        if train.token_projection is not None:
            projection = tuple(torch.as_tensor(p) for p in train.token_projection)
    return ProbeHead(
        head_type=cfg.head.type,
        text_features=train.text_features,
        logit_scale=logit_scale,
        init=cfg.head.init,
        token_width=token_width,
        token_projection=projection,
        depth=cfg.head.depth,
        decoder_heads=cfg.head.decoder_heads,
        mlp_ratio=cfg.head.mlp_ratio,
        seed=cfg.train.seed,
        comm=comm,
        chunk_rows=cfg.head.chunk_rows,
        device=device,
    )


def _stage2_head(cfg, train, comm: ClassGroup, device) -> ProbeHead:
    """The trained head of `stage2.from`, its representation frozen, with the classifier reset
    (crt) or a calibration added (lws, disalign, marc)."""
    source = cfg.stage2.source
    state, meta = read_trained(source, f"stage2.from={source}")
    options = dict(meta["head_options"])
    kind = meta.get("head_type", "candle")
    if kind not in PROBE_TYPES:
        raise UserInputError(
            f"stage2.from={source} holds a {kind} head; stage 2 ({', '.join(STAGE2_METHODS)}) "
            "re-trains the classifier of a decoder or linear run: train one with "
            "head.type=decoder or head.type=linear first"
        )
    if kind != cfg.head.type:
        raise UserInputError(
            f"stage2.from={source} holds a {kind} head but head.type={cfg.head.type}: set "
            f"head.type={kind}"
        )
    if options.get("calibration", "none") != "none":
        raise UserInputError(
            f"stage2.from={source} is itself a second-stage ({options['calibration']}) run: start "
            "stage 2 from the first-stage run's final/"
        )
    if int(state["weight"].shape[0]) != train.num_classes:
        raise UserInputError(
            f"stage2.from={source} was trained on {int(state['weight'].shape[0])} classes but "
            f"{train.source} has {train.num_classes}: use the store the first stage trained on"
        )
    prov.check_same(
        meta.get("provenance") or {},
        train.provenance,
        f"stage2.from={source}",
        f"training store {train.source}",
        fix="train stage 2 on the store the first stage was trained on",
    )
    method = cfg.stage2.method
    options.update(calibration="none" if method == "crt" else method, init=cfg.head.init)
    options.update(seed=cfg.train.seed, chunk_rows=cfg.head.chunk_rows)
    head = ProbeHead(text_features=train.text_features, comm=comm, device=device, **options)
    head.load_full_state_dict(state, strict=False)
    if method == "crt":
        head.reset_classifier(train.text_features.to(head.weight.device))
    head.freeze_representation(train_classifier=method == "crt")
    return head


def read_trained(folder: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(head.pt state, head_meta.json) of a trained run's final/ or best/ folder."""
    folder = Path(folder)
    meta_file, head_file = folder / "head_meta.json", folder / "head.pt"
    for file in (meta_file, head_file):
        if not file.exists():
            raise UserInputError(
                f"{what}: {file} does not exist; give the final/ (or best/) folder of a "
                "`candle-dist train` run"
            )
    try:
        meta = json.loads(meta_file.read_text())
        missing = [key for key in META_KEYS if key not in meta]
        if missing:
            raise ValueError(f"head_meta.json lacks {', '.join(missing)}")
        state = torch.load(head_file, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise _invalid(what, folder, err) from None
    return state, meta


def load_head(
    folder: str | Path, device: torch.device | str = "cpu", what: str = "--checkpoint"
) -> tuple[CandleHead | ProbeHead, dict]:
    """(trained head on `device`, one process; head_meta.json) of a run's final/ folder."""
    state, meta = read_trained(folder, what)
    options = dict(meta["head_options"])
    try:
        if meta.get("head_type", "candle") in PROBE_TYPES:
            return ProbeHead.from_state_dict(state, device=device, **options), meta
        return CandleHead.from_state_dict(state, device=device, **options), meta
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _invalid(what, folder, err) from None


def _invalid(what: str, folder: str | Path, err: Exception) -> UserInputError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserInputError(f"{what}: {folder} is not a valid candle_dist checkpoint ({reason})")


def require_candle_run(folder: str | Path, command: str) -> None:
    """Stop `command` (predict, export, add-classes: they use the Candle head's exported
    classifier) on a decoder/linear run's folder with the one line that says so."""
    meta_file = Path(folder) / "head_meta.json"
    try:
        kind = json.loads(meta_file.read_text()).get("head_type", "candle")
    except (OSError, ValueError, AttributeError):
        return  # no readable record: the command's own checks report the folder
    if kind != "candle":
        raise UserInputError(
            f"{folder} holds a {kind} head; `candle-dist {command}` uses the Candle head's "
            "exported classifier: evaluate this run with `candle-dist eval` (decoder and linear "
            "heads are scored there)"
        )
