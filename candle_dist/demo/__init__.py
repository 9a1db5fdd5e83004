"""The offline demo: a tiny CLIP and the end-to-end run."""
