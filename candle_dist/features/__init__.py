"""Features: frozen-CLIP extraction, the feature store, text prompts."""
