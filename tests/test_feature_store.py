"""FeatureStore: memory-mapped reads across shard files, views, class files, clear errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from candle_dist.errors import UserInputError
from candle_dist.features.store import FeatureStore, shard_loss
from candle_dist.provenance import provenance


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    n, d, c = 250, 8, 7
    return {
        "features": rng.normal(size=(n, d)).astype(np.float32),
        "labels": rng.integers(0, 5, n),
        "views": rng.normal(size=(n, 3, d)).astype(np.float32),
        "text": rng.normal(size=(c, d)).astype(np.float32),
        "names": [f"class {i}" for i in range(c)],
    }


def _store(path, a, **kwargs) -> FeatureStore:
    return FeatureStore.from_arrays(
        path,
        a["features"],
        a["labels"],
        None,
        a["text"],
        a["names"],
        None,
        5,
        views=a["views"],
        samples_per_shard=64,
        **kwargs,
    )


def test_from_arrays_round_trips_across_shard_files(tmp_path, arrays):
    store = _store(tmp_path / "s", arrays, logit_scale=4.6)
    x = arrays["features"]
    assert len(store) == 250 and store.dim == 8 and store.features.shape == (250, 8)
    assert len(store.manifest["shards"]) == 4 and store.num_views == 3
    index = np.array([5, 150, 249, 0, 63, 64, 128])
    np.testing.assert_array_equal(store.features[index], x[index])
    np.testing.assert_array_equal(store.features[60:70], x[60:70])
    np.testing.assert_array_equal(store.features[-1], x[-1])
    np.testing.assert_array_equal(store.features[np.array([[1, 2], [200, 3]])].shape, (2, 2, 8))
    assert store.features[index].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(store.features), x)
    view_ids = np.array([0, 1, 2, 2, 1, 0, 1])
    np.testing.assert_array_equal(store.views(index, view_ids), arrays["views"][index, view_ids])
    np.testing.assert_array_equal(store.labels, arrays["labels"])
    assert store.counts.tolist() == np.bincount(arrays["labels"], minlength=7).tolist()
    assert store.counts[5:].tolist() == [0, 0] and store.num_base_classes == 5
    assert store.classnames == arrays["names"] and store.keys[:2] == ["000000000", "000000001"]
    np.testing.assert_array_equal(store.text_features, arrays["text"])
    assert store.logit_scale == 4.6


def test_store_pickles_without_mapped_data_and_limits_open_files(tmp_path, arrays):
    store = _store(tmp_path / "s", arrays)
    store.features.max_open = 2
    np.testing.assert_array_equal(np.asarray(store.features), arrays["features"])
    assert len(store.features._open) == 2
    clone = pickle.loads(pickle.dumps(store))
    assert len(clone.features._open) == 0
    np.testing.assert_array_equal(clone.features[[7, 200]], arrays["features"][[7, 200]])


def test_float16_storage_reads_float32(tmp_path, arrays):
    store = FeatureStore.from_arrays(
        tmp_path / "s",
        arrays["features"],
        arrays["labels"],
        None,
        arrays["text"],
        arrays["names"],
        np.arange(7),
        5,
        dtype="float16",
    )
    assert store.features[:3].dtype == np.float32 and store.counts.tolist() == list(range(7))
    np.testing.assert_allclose(store.features[:], arrays["features"], atol=5e-3)
    with pytest.raises(UserInputError, match="without augmented views"):
        store.views([0], [0])


def test_missing_or_damaged_store_names_the_file(tmp_path, arrays):
    with pytest.raises(UserInputError, match=r"manifest\.json: no feature store here"):
        FeatureStore(tmp_path / "nothing")
    path = tmp_path / "s"
    _store(path, arrays)
    with pytest.raises(UserInputError, match="already holds a feature store"):
        _store(path, arrays)
    np.save(path / "labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(UserInputError, match=r"labels\.npy: shape \(3,\)"):
        FeatureStore(path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(UserInputError, match="re-extract"):
        FeatureStore(path)


def test_manifest_records_provenance_and_losses(tmp_path, arrays):
    store = _store(tmp_path / "s", arrays, templates=["a photo of a {}."])
    expected = provenance(
        arrays["names"], model="arrays", pretrained="none", templates=["a photo of a {}."], dim=8
    )
    assert store.provenance == expected == store.manifest["provenance"]
    assert store.manifest["num_lost"] == 0 and not store.manifest["num_lost_is_lower_bound"]
    manifest = dict(store.manifest)
    del manifest["provenance"]  # a store written before provenance was recorded
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert FeatureStore(tmp_path / "s").provenance == {}


def test_shard_loss_is_exact_when_the_shard_count_is_known():
    record = {"num_samples": 50, "skipped": [{"key": "k50", "reason": "truncated tar"}]}
    assert shard_loss({**record, "expected_samples": 101, "damaged_after": 50}) == (51, False)
    assert shard_loss({**record, "damaged_after": 50}) == (1, True)  # and an unknown rest
    assert shard_loss({"num_samples": 3, "skipped": []}) == (0, False)
