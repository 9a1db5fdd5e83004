"""Prompt templates with per-class fields (iNaturalist taxonomy) and their text features."""

import pytest
import torch

from candle_dist.errors import UserInputError
from candle_dist.features.prompts import encode_classnames, fill_template, read_class_info


def test_fill_template_name_and_fields():
    info = {"family": "Corvidae", "genus": "Corvus"}
    assert fill_template("a photo of a {}, a kind of {family}.", "raven", info) == (
        "a photo of a raven, a kind of Corvidae."
    )
    assert fill_template("a {}.", "x", None) == "a x."
    with pytest.raises(UserInputError, match="order"):
        fill_template("a {}, {order}.", "raven", info)
    with pytest.raises(UserInputError, match="--class-info"):
        fill_template("a {}, {order}.", "raven", None)


def test_read_class_info(tmp_path):
    good = tmp_path / "info.tsv"
    good.write_text("id\tname\tfamily\n0\ta\tF0\n1\tb\tF1\n")
    assert read_class_info(good, 2)[1]["family"] == "F1"
    with pytest.raises(UserInputError, match="2 rows but 3 classes"):
        read_class_info(good, 3)
    shuffled = tmp_path / "bad.tsv"
    shuffled.write_text("id\tfamily\n1\tF1\n0\tF0\n")
    with pytest.raises(UserInputError, match="expected 0"):
        read_class_info(shuffled, 2)
    with pytest.raises(UserInputError, match="not found"):
        read_class_info(tmp_path / "missing.tsv", 2)


class _EchoModel(torch.nn.Module):
    """Text 'features' = the token ids, so the prompts can be read back."""

    def encode_text(self, tokens):
        return tokens.float()


def test_encode_classnames_averages_templates_with_fields():
    prompts = []

    def tokenizer(texts):
        prompts.extend(texts)
        return torch.tensor([[len(t)] for t in texts])

    info = [{"family": "AB"}, {"family": "ABCD"}]
    text = encode_classnames(
        _EchoModel(), tokenizer, ["x", "yy"], ["{}", "{} {family}"], class_info=info
    )
    assert prompts == ["x", "yy", "x AB", "yy ABCD"]
    assert text[:, 0].tolist() == [(1 + 4) / 2, (2 + 7) / 2]
