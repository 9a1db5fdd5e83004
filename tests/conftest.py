"""Fixtures shared by several test files."""

import pytest

from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.features.store import FeatureStore


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A small long-tailed train and val feature store (30 classes, 6 of them new)."""
    root = tmp_path_factory.mktemp("stores")
    s = make_synthetic_features(30, 32, imbalance_ratio=10, max_count=40, num_new=6, seed=2)
    common = dict(
        text_features=s.text_features.numpy(),
        classnames=s.classnames,
        num_base_classes=s.num_base_classes,
    )
    FeatureStore.from_arrays(
        root / "train",
        s.train_features.numpy(),
        s.train_labels.numpy(),
        None,
        counts=s.counts.numpy(),
        **common,
    )
    FeatureStore.from_arrays(
        root / "val", s.val_features.numpy(), s.val_labels.numpy(), None, counts=None, **common
    )
    return root
