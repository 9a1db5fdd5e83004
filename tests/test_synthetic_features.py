"""Synthetic CLIP-like features: determinism, shapes, count profiles, a task separating methods."""

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from candle_dist.data.synthetic_features import (
    exponential_counts,
    load_counts_tsv,
    make_synthetic_features,
)
from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import evaluate

# The real Places-LT profile (365 classes, 62,500 images), committed with its source record.
PLACES_COUNTS = Path(__file__).resolve().parents[1] / "configs/data/places_lt_train_counts.tsv"


def test_same_seed_same_tensors_other_seed_other_tensors():
    a = make_synthetic_features(30, 16, num_new=5, val_per_class=2, seed=3)
    b = make_synthetic_features(30, 16, num_new=5, val_per_class=2, seed=3)
    c = make_synthetic_features(30, 16, num_new=5, val_per_class=2, seed=4)
    for name in ("train_features", "train_labels", "val_features", "text_features", "counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.train_features, c.train_features)
    assert not torch.equal(a.text_features, c.text_features)


def test_shapes_dtypes_and_base_new_split():
    data = make_synthetic_features(
        50, 24, num_new=8, max_count=40, imbalance_ratio=10, val_per_class=3
    )
    num_train = int(data.counts.sum())
    assert data.train_features.shape == (num_train, 24)
    assert data.train_features.dtype == torch.float32
    assert data.train_labels.dtype == torch.int64
    assert torch.equal(data.train_labels, torch.repeat_interleave(torch.arange(50), data.counts))
    assert data.val_features.shape == (150, 24) and data.val_features.dtype == torch.float32
    assert torch.equal(torch.bincount(data.val_labels), torch.full((50,), 3))
    assert data.text_features.shape == (50, 24) and data.text_features.dtype == torch.float32
    assert data.counts.dtype == torch.int64
    assert data.num_base_classes == 42 and data.num_classes == 50
    assert (data.counts[:42] >= 1).all() and (data.counts[42:] == 0).all()
    assert torch.equal(data.counts[:42], exponential_counts(42, 40, 10))
    assert data.classnames[0] == "class_00000" and data.classnames[-1] == "class_00049"
    # CLIP-like, unnormalized norms
    assert data.text_features.norm(dim=1).allclose(torch.tensor(8.0))
    assert data.train_features.norm(dim=1).mean() == pytest.approx(10.0, rel=0.05)


@pytest.mark.parametrize(
    ("num_classes", "max_count", "ratio"), [(100, 100, 100), (1000, 500, 50), (8142, 1000, 500)]
)
def test_exponential_counts_profile(num_classes, max_count, ratio):
    counts = exponential_counts(num_classes, max_count, ratio)
    assert counts.shape == (num_classes,) and counts.dtype == torch.int64
    assert int(counts[0]) == max_count and int(counts[-1]) == round(max_count / ratio)
    assert int(counts.max()) / int(counts.min()) == pytest.approx(ratio, rel=0.01)
    assert (counts[1:] <= counts[:-1]).all()
    assert exponential_counts(5, 3, 100).min() == 1  # never below one image
    assert exponential_counts(1, 7, 10).tolist() == [7]


def test_imbalance_ratio_below_one_is_rejected_with_the_inverse():
    with pytest.raises(UserInputError, match="did you mean 50"):
        exponential_counts(10, 100, 0.02)


def test_places_lt_counts_file():
    counts = load_counts_tsv(PLACES_COUNTS)
    assert counts.shape == (365,) and counts.dtype == torch.int64
    assert int(counts.sum()) == 62_500
    assert int(counts.max()) == 4_980 and int(counts.min()) == 5
    data = make_synthetic_features(365, 32, counts=counts, num_new=65, val_per_class=1)
    assert torch.equal(data.counts[:300], counts[:300]) and (data.counts[300:] == 0).all()
    assert data.train_features.shape[0] == int(counts[:300].sum())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("class_id\tcount\n0\t5\n2\t7\n", "class 1 is missing"),
        ("0\t5\n1\t5\n1\t7\n", "counts.tsv:3: class 1 already has a count on line 2"),
        ("0\t5\n1\tseven\n", r"counts.tsv:2: class id and count must be integers"),
        ("0\t5\t9\n", r"counts.tsv:1: expected 'class_id<TAB>count'"),
        ("0\t-3\n", "negative count"),
        ("# nothing\n", "no 'class_id<TAB>count' lines"),
    ],
)
def test_bad_counts_files_name_the_line(tmp_path, text, match):
    path = tmp_path / "counts.tsv"
    path.write_text(text)
    with pytest.raises(UserInputError, match=match):
        load_counts_tsv(path)


def test_bad_arguments():
    with pytest.raises(UserInputError, match="cannot read counts file"):
        load_counts_tsv("/nonexistent/counts.tsv")
    with pytest.raises(UserInputError, match="3 entries for num_classes = 4"):
        make_synthetic_features(4, 8, counts=[5, 5, 5])
    with pytest.raises(UserInputError, match="base class 1 has 0 images"):
        make_synthetic_features(4, 8, counts=[5, 0, 5, 5], num_new=1)
    with pytest.raises(UserInputError, match="num_new"):
        make_synthetic_features(4, 8, num_new=4)


def test_tokens_project_onto_the_features_and_leave_the_rest_as_it_was():
    plain = make_synthetic_features(40, 16, num_new=4, max_count=20, val_per_class=2, seed=5)
    data = make_synthetic_features(
        40, 16, num_new=4, max_count=20, val_per_class=2, seed=5, num_tokens=5, token_dim=24
    )
    for name in ("train_features", "val_features", "text_features", "counts", "val_labels"):
        assert torch.equal(getattr(plain, name), getattr(data, name)), name
    assert plain.train_tokens is None and plain.token_projection is None
    assert data.train_tokens.shape == (len(data.train_labels), 5, 24)
    assert data.val_tokens.shape == (len(data.val_labels), 5, 24)
    assert data.train_tokens.dtype == data.val_tokens.dtype == torch.float16
    matrix, bias = data.token_projection
    assert matrix.shape == (24, 16) and bias.shape == (16,) and matrix.dtype == torch.float32
    for tokens, features in (
        (data.train_tokens, data.train_features),
        (data.val_tokens, data.val_features),
    ):
        projected = tokens[:, 0].float() @ matrix + bias
        assert torch.allclose(projected, features, atol=0.02)
    patches = data.train_tokens[:, 1:].float() @ matrix + bias  # not copies of the feature
    assert not torch.allclose(patches, data.train_features[:, None].expand_as(patches), atol=1)
    again = make_synthetic_features(
        40, 16, num_new=4, max_count=20, val_per_class=2, seed=5, num_tokens=5, token_dim=24
    )
    assert torch.equal(again.train_tokens, data.train_tokens)
    with pytest.raises(UserInputError, match="token_dim: 8 is below dim = 16"):
        make_synthetic_features(10, 16, num_tokens=2, token_dim=8)
    with pytest.raises(UserInputError, match="num_distractors"):
        make_synthetic_features(10, 16, num_tokens=2, num_distractors=0)


def _zero_shot_and_nearest_class_mean(data):
    """Cosine scores of the val images against the text features and the class-mean prototypes."""
    base, dim = data.num_base_classes, data.train_features.shape[1]
    sums = torch.zeros(base, dim).index_add_(0, data.train_labels, data.train_features)
    prototypes = sums / data.counts[:base, None]
    images = F.normalize(data.val_features, dim=1)
    zero_shot = images @ F.normalize(data.text_features, dim=1).T
    nearest_mean = torch.cat([images @ F.normalize(prototypes, dim=1).T, zero_shot[:, base:]], 1)
    return (
        evaluate(scores, data.val_labels, data.counts, base) for scores in (zero_shot, nearest_mean)
    )


def test_nearest_class_mean_beats_text_zero_shot_which_beats_chance():
    data = make_synthetic_features(
        200, 64, num_new=40, max_count=300, imbalance_ratio=100, val_per_class=20
    )
    zero_shot, nearest_mean = _zero_shot_and_nearest_class_mean(data)
    chance_base, chance_new = 1 / 160, 1 / 40
    assert zero_shot["base"] > 20 * chance_base
    assert zero_shot["new"] > 10 * chance_new
    assert zero_shot["base"] < 0.75  # text is an imperfect classifier
    assert nearest_mean["base"] > zero_shot["base"] + 0.15
    assert nearest_mean["many"] > nearest_mean["few"]  # tail prototypes are noisier


def test_inat_scale_is_generated_in_seconds():
    start = time.perf_counter()
    data = make_synthetic_features(
        8142, 512, max_count=30, imbalance_ratio=15, num_new=0, val_per_class=1
    )
    elapsed = time.perf_counter() - start
    assert 45_000 < data.train_features.shape[0] < 90_000
    assert elapsed < 15.0, f"{elapsed:.1f} s"
