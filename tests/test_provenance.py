"""The provenance record and its comparison: the first differing field, both sides named."""

import hashlib

import pytest

from candle_dist.data.shards import write_classnames
from candle_dist.errors import UserInputError
from candle_dist.provenance import FIELDS, check_same, classes_sha256, provenance

NAMES = ["cat", "dog", "eel"]


def _record(names=NAMES, **changes):
    fields = {"model": "ViT-B-16", "pretrained": "openai", "templates": ["a {}."], "dim": 512}
    return provenance(names, **{**fields, **changes})


def test_record_fields_and_class_list_hash(tmp_path):
    record = _record()
    assert set(record) == set(FIELDS)
    assert record["num_classes"] == 3 and record["dim"] == 512
    write_classnames(tmp_path / "classnames.txt", NAMES)
    assert (
        record["classes_sha256"]
        == hashlib.sha256((tmp_path / "classnames.txt").read_bytes()).hexdigest()
    )
    assert classes_sha256(NAMES[::-1]) != classes_sha256(NAMES)


@pytest.mark.parametrize(
    ("theirs", "message"),
    [
        (_record(NAMES[:2]), "num_classes 3 != 2"),
        (_record(NAMES[::-1]), "the class lists differ (same count, other names or order)"),
        (_record(dim=768), "dim 512 != 768"),
        (_record(model="ViT-L-14"), "model 'ViT-B-16' != 'ViT-L-14'"),
        (_record(pretrained="laion2b"), "pretrained 'openai' != 'laion2b'"),
        (_record(templates=["b {}."]), "templates ['a {}.'] != ['b {}.']"),
    ],
)
def test_a_difference_names_the_field_both_sides_and_the_fix(theirs, message):
    with pytest.raises(UserInputError) as caught:
        check_same(_record(), theirs, "store s", "checkpoint c", fix="use the right one")
    want = f"store s and checkpoint c do not match: {message}; use the right one"
    assert str(caught.value) == want


def test_unrecorded_fields_and_unselected_fields_are_not_compared():
    old = {"num_classes": 3, "classes_sha256": classes_sha256(NAMES)}  # an older artifact
    check_same(_record(), old, "a", "b", fix="-")
    unrecorded = _record(model=None, templates=None)
    check_same(unrecorded, _record(model="x", templates=["y {}"]), "a", "b", fix="-")
    check_same(_record(), _record(NAMES[:1]), "a", "b", fix="-", fields=("dim", "model"))
    check_same(_record(), {}, "a", "b", fix="-")


def test_long_values_are_shortened():
    many = [f"template {i}: a photo of a {{}}." for i in range(20)]
    with pytest.raises(UserInputError, match=r"templates .{77}\.\.\. != ") as caught:
        check_same(_record(templates=many), _record(), "a", "b", fix="-")
    assert len(str(caught.value)) < 250
