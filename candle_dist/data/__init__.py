"""Data: WebDataset shards, procedural images, synthetic CLIP-like features."""
