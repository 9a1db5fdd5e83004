"""The offline tiny CLIP: held-out split, preprocessing, reproducible cached checkpoints."""

import json

import numpy as np
import open_clip
import pytest
import torch

from candle_dist import cli
from candle_dist.cache import default_cache_dir
from candle_dist.data.synthetic_images import COLOURS, SHAPES, TEXTURES, all_classes, render
from candle_dist.demo import tiny_clip


@pytest.fixture
def small_recipe(monkeypatch):
    """Shrink the image pools and the evaluation so a few-step build takes seconds."""
    monkeypatch.setattr(tiny_clip, "IMAGES_PER_CLASS", 2)
    monkeypatch.setattr(tiny_clip, "EVAL_CLASSES", 20)
    monkeypatch.setattr(tiny_clip, "EVAL_IMAGES_PER_CLASS", 2)
    monkeypatch.setattr(tiny_clip, "EVAL_ALL_IMAGES_PER_CLASS", 1)
    monkeypatch.setattr(tiny_clip, "BATCH_SIZE", 32)


def test_held_out_combinations_keep_every_attribute_and_pair_seen():
    seen = tiny_clip.pretraining_classes()
    held_out = [cls for cls in all_classes() if tiny_clip.is_held_out(cls)]
    assert len(seen) + len(held_out) == len(all_classes())
    assert 0.15 < len(held_out) / len(all_classes()) < 0.35
    assert {c.shape for c in seen} == set(SHAPES)
    assert {c.colour for c in seen} == set(COLOURS)
    assert {c.texture for c in seen} == set(TEXTURES)
    for a, b in (("shape", "colour"), ("shape", "texture"), ("colour", "texture")):
        pairs = {(getattr(c, a), getattr(c, b)) for c in seen}
        assert pairs == {(getattr(c, a), getattr(c, b)) for c in all_classes()}


def test_training_input_matches_open_clip_eval_transform():
    model, _ = tiny_clip.create_model()
    _, _, preprocess = open_clip.create_model_and_transforms(tiny_clip.MODEL_NAME)
    rng = np.random.default_rng(0)
    images = [render(cls, rng) for cls in all_classes()[:4]]
    ours = tiny_clip.to_model_input(
        torch.from_numpy(np.stack([np.asarray(i) for i in images])), model
    )
    theirs = torch.stack([preprocess(image) for image in images])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("CANDLE_DIST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "candle_dist"
    monkeypatch.setenv("CANDLE_DIST_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    path = tiny_clip.checkpoint_path(seed=3, steps=5)
    assert path.parent == tmp_path / "mine" and "seed3" in path.name
    assert path != tiny_clip.checkpoint_path(seed=3, steps=6)
    assert tiny_clip.checkpoint_path(tmp_path / "x", seed=3, steps=5).parent == tmp_path / "x"


def test_pretrain_saves_a_loadable_reproducible_checkpoint(small_recipe, tmp_path, monkeypatch):
    assert cli.main(["pretrain-tiny", "--cache-dir", str(tmp_path / "a"), "--steps", "3"]) == 0
    (path_a,) = (tmp_path / "a").glob("*.pt")
    report = json.loads(path_a.with_suffix(".json").read_text())
    assert report["steps"] == 3 and report["seed"] == 0
    assert set(report["zero_shot"]) == {"classes_20", "classes_all"}
    assert list(tmp_path.glob("a/.*")) == []  # no temporary files left behind

    model, _, _ = open_clip.create_model_and_transforms(
        tiny_clip.MODEL_NAME, pretrained=str(path_a)
    )
    saved = torch.load(path_a, weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    path_b = tiny_clip.ensure_tiny_clip(str(tmp_path / "b"), seed=0, steps=3)
    assert path_b.name == path_a.name
    assert path_b.read_bytes() == path_a.read_bytes()
    again = torch.load(path_b, weights_only=True)
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved)

    other_seed = torch.load(tiny_clip.ensure_tiny_clip(str(tmp_path / "b"), seed=1, steps=3))
    assert not all(torch.equal(saved[k], other_seed[k]) for k in saved)

    def must_not_train(**kwargs):
        raise AssertionError("retrained although the checkpoint is cached")

    monkeypatch.setattr(tiny_clip, "pretrain", must_not_train)
    assert tiny_clip.ensure_tiny_clip(str(tmp_path / "a"), seed=0, steps=3) == path_a


def test_pretrain_rejects_bad_steps(tmp_path, capsys):
    assert cli.main(["pretrain-tiny", "--cache-dir", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["pretrain-tiny", "--cache-dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
