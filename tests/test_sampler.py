"""Epoch sampling: uniform permutations as before, class-rebalanced draws, determinism."""

import numpy as np
import pytest

from candle_dist.config import load_config
from candle_dist.errors import UserInputError
from candle_dist.train.sampler import SAMPLERS, epoch_indices

# a long tail: class c has 2^(7 - c) samples (128 ... 1), classes 8 and 9 have none (new)
COUNTS = np.array([128, 64, 32, 16, 8, 4, 2, 1, 0, 0])
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))


def test_uniform_is_the_permutation_earlier_runs_used():
    """Checkpoints of earlier versions resume onto the same batches."""
    for epoch in range(3):
        want = np.random.default_rng([7, epoch]).permutation(len(LABELS))
        assert np.array_equal(epoch_indices("uniform", 7, epoch, LABELS), want)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_an_epoch_has_n_draws_decided_by_seed_and_epoch(sampler):
    first = epoch_indices(sampler, 3, 5, LABELS)
    assert first.shape == (len(LABELS),) and first.dtype == np.int64
    assert first.min() >= 0 and first.max() < len(LABELS)
    assert np.array_equal(first, epoch_indices(sampler, 3, 5, LABELS))
    assert not np.array_equal(first, epoch_indices(sampler, 3, 6, LABELS))
    assert not np.array_equal(first, epoch_indices(sampler, 4, 5, LABELS))


@pytest.mark.parametrize(("sampler", "power"), [("class_balanced", 0.0), ("square_root", 0.5)])
def test_classes_are_drawn_in_proportion_to_a_power_of_their_count(sampler, power):
    drawn = np.concatenate([LABELS[epoch_indices(sampler, 0, e, LABELS)] for e in range(200)])
    frequency = np.bincount(drawn, minlength=len(COUNTS)) / len(drawn)
    want = np.where(COUNTS > 0, COUNTS.astype(float) ** power, 0.0)
    want /= want.sum()
    assert frequency[8:].sum() == 0  # classes without images are never drawn
    np.testing.assert_allclose(frequency, want, atol=0.01)


def test_within_a_class_every_sample_is_drawn():
    indices = np.concatenate([epoch_indices("class_balanced", 0, e, LABELS) for e in range(100)])
    of_class_0 = np.flatnonzero(LABELS == 0)
    assert set(indices[LABELS[indices] == 0]) == set(of_class_0)
    assert set(indices[LABELS[indices] == 7]) == set(np.flatnonzero(LABELS == 7))


def test_an_unknown_sampler_is_a_config_error(tmp_path):
    with pytest.raises(UserInputError, match=r"train\.sampler='balanced': choose one of"):
        load_config(None, ["train.sampler=balanced"])
    with pytest.raises(UserInputError, match="choose one of uniform"):
        epoch_indices("balanced", 0, 0, LABELS)
