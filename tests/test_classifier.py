"""The exported classifier: batch-independent; equals dense attention with image-free classes."""

import pytest
import torch

from candle_dist.classifier import ExportedClassifier, export_classifier
from candle_dist.model.head import CandleHead
from candle_dist.provenance import provenance
from tests.oracle import DenseCandleHead, dense_mask

C, C_BASE, D = 9, 6, 16


@pytest.mark.parametrize("mask", ["none", "in_visual", "in_text", "between_visual_text"])
def test_export_is_batch_independent_and_matches_dense_formula(tmp_path, mask):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(C, D, generator=g, dtype=torch.float64)
    protos = torch.randn(C_BASE, D, generator=g, dtype=torch.float64)
    head = CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=2.0,
        visual_scale=0.5,
        mask=mask,
        num_heads=4,
    ).double()
    torch.nn.init.normal_(head.fusion.attn.in_proj_bias, std=0.1)
    path = tmp_path / "classifier.pt"
    export_classifier(head, path, [f"c{i}" for i in range(C)])
    clf = ExportedClassifier.load(path)
    images = torch.randn(5, D, generator=g, dtype=torch.float64)
    scores = clf.scores(images)
    assert torch.allclose(clf.scores(images[2:3]), scores[2:3], rtol=1e-12)
    assert torch.allclose(clf.scores(images.flip(0)).flip(0), scores, rtol=1e-12)

    # dense: one image among the class tokens, which may not attend to it
    oracle = DenseCandleHead(text, protos, 2.0, 0.5, mask, "text", True, 4).double()
    oracle.load_from(head)
    oracle.eval()
    for i in range(len(images)):
        x = images[i : i + 1]
        xi = x @ oracle.proj_image
        xv = torch.cat([oracle.visual_prototypes, oracle.virtual_prototypes]) @ oracle.proj_image
        xt = oracle.text_storage @ oracle.proj_text
        tokens = oracle.norm(torch.cat([xi, xv, xt]))
        block = dense_mask(mask, 1, C)
        block[1:, 0] = True
        attn, _ = oracle.attn(tokens, tokens, tokens, attn_mask=block, need_weights=False)
        y = tokens + oracle.ratio * attn
        n = torch.nn.functional.normalize
        ref = oracle.s * n(y[:1]) @ n(y[1 + C :]).t() + oracle.s_v * n(y[:1]) @ n(y[1 : 1 + C]).t()
        assert torch.allclose(scores[i : i + 1], ref, rtol=1e-9), mask
    top = clf.topk(images[:1], k=3)[0]
    assert len(top) == 3 and top[0][0].startswith("c")
    assert clf.scores(images, "base").shape == (5, C_BASE)
    assert clf.scores(images, "new").shape == (5, C - C_BASE)


def test_loading_something_else_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an exported candle_dist classifier"):
        ExportedClassifier.load(path)


def test_provenance_is_stored_and_a_damaged_file_is_a_clear_error(tmp_path):
    head = CandleHead(
        text_features=torch.randn(C, D),
        visual_prototypes=torch.randn(C_BASE, D),
        logit_scale=2.0,
        num_heads=4,
    )
    names = [f"c{i}" for i in range(C)]
    record = provenance(names, model="ViT-B-16", pretrained="openai", templates=["{}"], dim=D)
    path = tmp_path / "classifier.pt"
    export_classifier(head, path, names, record)
    assert ExportedClassifier.load(path).provenance == record  # loads with weights_only
    export_classifier(head, path, names)  # no record (as before it was recorded): names, dim
    assert ExportedClassifier.load(path).provenance == provenance(
        names, model=None, pretrained=None, templates=None, dim=D
    )
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"classifier\.pt cannot be loaded .* damaged; rerun"):
        ExportedClassifier.load(path)
    with pytest.raises(ValueError, match="does not exist: pass the final/ directory"):
        ExportedClassifier.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("mask", ["in_visual", "between_visual_text"])
def test_export_directory_round_trip_and_its_damage(tmp_path, mask):
    from candle_dist.classifier import load, write_directory

    head = CandleHead(
        text_features=torch.randn(C, D, dtype=torch.float64),
        visual_prototypes=torch.randn(C_BASE, D, dtype=torch.float64),
        logit_scale=2.0,
        mask=mask,
        num_heads=4,
    ).double()
    names = [f"c {i}, ü" for i in range(C)]
    record = provenance(names, model="ViT-B-16", pretrained="openai", templates=["{}"], dim=D)
    final = tmp_path / "final"
    final.mkdir()
    export_classifier(head, final / "classifier.pt", names, record)
    clf = load(final)  # a run's final/ is read through its classifier.pt
    folder = tmp_path / "export"
    folder.mkdir()
    write_directory(clf, folder, {"model": "ViT-B-16", "pretrained": "openai"})
    again = load(folder)
    images = torch.randn(4, D, dtype=torch.float64)
    assert torch.equal(again.scores(images), clf.scores(images))
    assert again.classnames == names and again.provenance == record
    assert again.state["mask"] == mask and again.state["text_columns"].dtype == torch.float64

    (folder / "classnames.txt").write_text("".join(f"{n}\n" for n in reversed(names)))
    with pytest.raises(ValueError, match=r"classnames\.txt is not the class list .* export"):
        load(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be loaded"):
        load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json missing\): pass a directory written by"):
        load(folder)
