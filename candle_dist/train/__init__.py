"""Training: the Accelerate trainer, configs, checkpoints."""

from __future__ import annotations

from candle_dist.exports import lazy_exports

_EXPORTS = {
    "Config": "candle_dist.config",
    "EvalData": "candle_dist.train.data",
    "TrainingData": "candle_dist.train.data",
    "eval_data_from_store": "candle_dist.train.data",
    "fit": "candle_dist.train.trainer",
    "load_config": "candle_dist.config",
    "training_data_from_store": "candle_dist.train.data",
    "training_data_from_synthetic": "candle_dist.train.data",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
