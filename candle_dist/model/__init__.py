"""Model: the Candle head, the baseline heads (linear probe, token decoder) and their losses."""

from __future__ import annotations

from candle_dist.exports import lazy_exports

_EXPORTS = {
    "AdjustedCrossEntropy": "candle_dist.model.losses",
    "BalancedSoftmaxLoss": "candle_dist.model.losses",
    "CandleHead": "candle_dist.model.head",
    "ClassBalancedLoss": "candle_dist.model.losses",
    "CompensatingLogitAdjustedLoss": "candle_dist.model.losses",
    "CrossEntropyLoss": "candle_dist.model.losses",
    "FocalLoss": "candle_dist.model.losses",
    "GeneralizedReweightLoss": "candle_dist.model.losses",
    "LADELoss": "candle_dist.model.losses",
    "LDAMLoss": "candle_dist.model.losses",
    "Fusion": "candle_dist.model.fusion",
    "ProbeHead": "candle_dist.model.probe",
    "TokenDecoder": "candle_dist.model.decoder",
    "build_head": "candle_dist.model.heads",
    "load_head": "candle_dist.model.heads",
    "LOSSES": "candle_dist.model.losses",
    "LogitAdjustedLoss": "candle_dist.model.losses",
    "build_loss": "candle_dist.model.losses",
    "loss_options": "candle_dist.model.losses",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
