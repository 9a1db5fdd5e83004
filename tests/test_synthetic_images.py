"""The synthetic image world: classes are deterministic and distinct, drawings are reproducible."""

import numpy as np
import pytest

from candle_dist.data.synthetic_images import (
    COLOURS,
    MAX_CLASSES,
    SHAPES,
    TEXTURES,
    VisualClass,
    all_classes,
    render,
    synthetic_classes,
)
from candle_dist.errors import UserInputError


def test_world_has_several_hundred_distinct_named_classes():
    classes = all_classes()
    assert len(classes) == MAX_CLASSES == len(SHAPES) * len(COLOURS) * len(TEXTURES) >= 300
    assert len({cls.name for cls in classes}) == len(classes)
    assert VisualClass("red", "striped", "circle").name == "red striped circle"


def test_synthetic_classes_are_deterministic_and_distinct():
    first = synthetic_classes(100, seed=3)
    assert first == synthetic_classes(100, seed=3)
    assert len(set(first)) == 100
    assert first != synthetic_classes(100, seed=4)
    assert synthetic_classes(40, seed=3) == first[:40]  # a smaller draw is a prefix
    assert sorted(synthetic_classes(MAX_CLASSES, seed=1), key=str) == sorted(all_classes(), key=str)


@pytest.mark.parametrize("count", [0, MAX_CLASSES + 1])
def test_synthetic_classes_rejects_impossible_counts(count):
    with pytest.raises(UserInputError, match="num_classes"):
        synthetic_classes(count, seed=0)


def test_captions_name_every_attribute():
    cls = VisualClass("orange", "outlined", "heart")
    captions = cls.captions()
    assert len(set(captions)) == len(captions) > 4
    assert "a photo of a orange outlined heart." in captions
    for caption in captions:
        assert "orange" in caption and "heart" in caption
        assert "outline" in caption
    rng = np.random.default_rng(0)
    assert {cls.caption(rng) for _ in range(200)} == set(captions)


def test_render_is_deterministic_given_the_generator():
    cls = VisualClass("blue", "checkered", "star")
    a = np.asarray(render(cls, np.random.default_rng(7)))
    b = np.asarray(render(cls, np.random.default_rng(7)))
    c = np.asarray(render(cls, np.random.default_rng(8)))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert render(cls, np.random.default_rng(7), size=32).size == (32, 32)


def test_render_draws_the_colour_and_the_texture():
    rng = np.random.default_rng(0)
    blue_pixels = []
    for texture in ("solid", "striped"):
        image = np.asarray(render(VisualClass("blue", texture, "square"), rng)).astype(int)
        # saturated blue: far more blue than red, which a grey background never is
        blue_pixels.append(((image[..., 2] - image[..., 0]) > 100).mean())
    solid, striped = blue_pixels
    assert solid > 0.05
    assert 0.2 * solid < striped < 0.8 * solid  # stripes replace part of the fill


def test_render_rejects_unknown_attributes():
    with pytest.raises(UserInputError, match="shape"):
        render(VisualClass("red", "solid", "blob"), np.random.default_rng(0))
    with pytest.raises(UserInputError, match="colour"):
        render(VisualClass("mauve", "solid", "circle"), np.random.default_rng(0))
