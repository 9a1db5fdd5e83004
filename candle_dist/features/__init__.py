"""Features: frozen-CLIP extraction, the feature store, text prompts."""

from __future__ import annotations

from candle_dist.exports import lazy_exports

_EXPORTS = {
    "FeatureStore": "candle_dist.features.store",
    "encode_classnames": "candle_dist.features.prompts",
    "extract": "candle_dist.features.extract",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
