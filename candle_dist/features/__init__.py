"""Features: frozen-CLIP extraction, the feature store, text prompts."""


def __getattr__(name: str):
    # Lazy, so `import candle_dist.features.x` does not pull in numpy-heavy store code.
    if name == "FeatureStore":
        from candle_dist.features.store import FeatureStore

        return FeatureStore
    raise AttributeError(name)
