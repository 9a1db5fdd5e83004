"""Subprocess body for the kill-and-resume and precision tests: a small synthetic training run.

python tests/train_script.py OUTPUT fresh|resume [section.key=value ...]
"""

import sys

import torch

from candle_dist.config import load_config
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.train.data import training_data_from_synthetic
from candle_dist.train.trainer import fit

if __name__ == "__main__":
    output, resume = sys.argv[1], sys.argv[2] == "resume"
    torch.set_num_threads(1)
    synthetic = make_synthetic_features(
        60, 32, imbalance_ratio=20, max_count=60, num_new=10, seed=3
    )
    train, _ = training_data_from_synthetic(synthetic)
    cfg = load_config(
        None,
        [
            f"train.output={output}",
            "optim.epochs=12",
            "optim.batch_size=32",
            "optim.lr=0.01",
            "head.num_heads=4",
            "train.checkpoint_every=7",
            *sys.argv[3:],
        ],
    )
    fit(cfg, train, resume=resume)
