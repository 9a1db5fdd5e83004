"""`candle-dist extract --tokens`: token states of ViT and ResNet towers, grids, resume, errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from candle_dist import cli
from candle_dist.errors import UserInputError
from candle_dist.features.clip_loading import load_clip
from candle_dist.features.extract import extract
from candle_dist.features.store import FeatureStore
from candle_dist.features.tokens import TokenTap, token_layout, token_projection
from candle_dist.train.data import eval_data_from_store, training_data_from_store, validate
from tests.data_helpers import (
    TINY_CONFIG,
    kill_after_first_shard,
    shard_spec,
    tiny_model_config,
    write_jpeg_shards,
)
from tests.dist_utils import run_in_processes

NUM_SHARDS, PER_SHARD = 6, 5
N = NUM_SHARDS * PER_SHARD
VIT_TOKENS, VIT_WIDTH = 1 + 4 * 4, 64  # 32 px images, 8 px patches: a 4 x 4 patch grid
RESNET_TOKENS, RESNET_WIDTH = 1 + 2 * 2, 16 * 32  # tiny-clip: 64 px -> a 2 x 2 map, 512 channels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy machine: one thread, and the same results run after run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _extract(spec: str, output: Path, **options) -> FeatureStore:
    options = {"batch_size": 1, "workers": 0, "progress": False, "tokens": True, **options}
    return FeatureStore(extract(spec, output, pretrained="none", **options)["store"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Shards of random JPEGs, the tiny ViT config, and stores with every token setting."""
    root = tmp_path_factory.mktemp("tokens")
    write_jpeg_shards(root / "shards", NUM_SHARDS, PER_SHARD, num_classes=4)
    config = tiny_model_config(root)
    spec = shard_spec(root / "shards", NUM_SHARDS)
    return {
        "root": root,
        "spec": spec,
        "config": config,
        "vit": _extract(spec, root / "vit", model_config=config),
        "vit_grid": _extract(spec, root / "vit-grid", model_config=config, token_grid=2),
        "resnet": _extract(spec, root / "resnet", model="tiny-clip"),
        "plain": _extract(spec, root / "plain", model_config=config, tokens=False),
    }


def _all_tokens(store: FeatureStore) -> np.ndarray:
    return store.tokens[np.arange(len(store))].astype(np.float32)


def test_resnet_tokens_are_the_mean_then_the_map_positions(data):
    store = data["resnet"]
    assert store.tokens.shape == (N, RESNET_TOKENS, RESNET_WIDTH)
    assert store.tokens[np.array([0, 7])].dtype == np.float16
    assert store.token_info == {
        "tower": "resnet",
        "count": RESNET_TOKENS,
        "width": RESNET_WIDTH,
        "grid": None,
        "source_grid": [2, 2],
        "projection": True,
    }
    tokens = _all_tokens(store)
    np.testing.assert_allclose(tokens[:, 0], tokens[:, 1:].mean(1), rtol=2e-3, atol=1e-3)
    matrix, bias = store.token_projection
    assert matrix.shape == (RESNET_WIDTH, 128) and bias.shape == (128,)
    assert matrix.dtype == bias.dtype == np.float32


def test_resnet_projection_is_attention_pooling_when_attention_is_uniform():
    clip, _, _ = load_clip("tiny-clip", "none")
    pool = clip.visual.attnpool
    for linear in (pool.q_proj, pool.k_proj):  # every score 0: uniform attention
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    layout = token_layout(clip.visual, "tiny-clip", None)
    tap = TokenTap(clip.visual, layout)
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        pooled = clip.encode_image(images)
        first = tap.take()[:, 0]
    matrix, bias = token_projection(clip.visual, layout)
    np.testing.assert_allclose(first.float().numpy() @ matrix + bias, pooled, atol=1e-4, rtol=0)


def test_vit_whose_layer_norm_follows_the_pooling_is_served(tmp_path):
    """ln_post is per token: applied before or after taking the class token, the same."""
    path = tmp_path / "dataplane-lnafter.json"
    vision = {**TINY_CONFIG["vision_cfg"], "final_ln_after_pool": True}
    path.write_text(json.dumps({**TINY_CONFIG, "vision_cfg": vision}))
    clip, _, _ = load_clip("", "none", path)
    layout = token_layout(clip.visual, "dataplane-lnafter", 2)
    assert (layout.count, layout.width, layout.source_grid) == (5, VIT_WIDTH, (4, 4))
    tap = TokenTap(clip.visual, layout)
    with torch.inference_mode():
        pooled = clip.encode_image(torch.randn(3, 3, 32, 32))
        first = tap.take()[:, 0].float().numpy()
    matrix, bias = token_projection(clip.visual, layout)
    np.testing.assert_allclose(first @ matrix + bias, pooled, rtol=1e-2, atol=5e-3)


def test_vit_class_token_times_proj_is_the_pooled_feature(data):
    store = data["vit"]
    assert store.tokens.shape == (N, VIT_TOKENS, VIT_WIDTH)
    assert store.token_info["tower"] == "vit" and store.token_info["source_grid"] == [4, 4]
    clip, preprocess, _ = load_clip("", "none", data["config"])
    matrix, bias = store.token_projection
    np.testing.assert_array_equal(matrix, clip.visual.proj.detach().numpy())
    assert not bias.any()
    tokens = _all_tokens(store)
    np.testing.assert_allclose(tokens[:, 0] @ matrix, store.features[:], rtol=1e-2, atol=5e-3)
    # every token is the tower's state after ln_post: encode one image by hand
    with tarfile.open(data["root"] / "shards" / "train-000002.tar") as tar:
        member = tar.extractfile("train_000012.jpg").read()
    image = preprocess(Image.open(io.BytesIO(member)).convert("RGB")).unsqueeze(0)
    visual = clip.visual
    with torch.inference_mode():
        expected = visual.ln_post(visual.transformer(visual._embeds(image)))[0].numpy()
    row = tokens[store.keys.index("train_000012")]
    np.testing.assert_allclose(row, expected, rtol=2e-2, atol=1e-2)


def test_token_grid_is_adaptive_average_pooling_of_the_patch_grid(data):
    full, pooled = _all_tokens(data["vit"]), _all_tokens(data["vit_grid"])
    assert pooled.shape == (N, 1 + 2 * 2, VIT_WIDTH)
    assert data["vit_grid"].token_info["grid"] == 2
    np.testing.assert_array_equal(pooled[:, 0], full[:, 0])  # the class token, untouched
    patches = full[:, 1:].reshape(N, 4, 4, VIT_WIDTH)
    by_hand = [
        patches[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2))
        for i in range(2)
        for j in range(2)
    ]
    np.testing.assert_allclose(pooled[:, 1:], np.stack(by_hand, 1), rtol=2e-3, atol=2e-3)


def test_resnet_token_grid_keeps_the_mean_first(data, tmp_path):
    store = _extract(
        shard_spec(data["root"] / "shards", 1), tmp_path / "s", model="tiny-clip", token_grid=1
    )
    tokens = _all_tokens(store)
    assert tokens.shape == (PER_SHARD, 2, RESNET_WIDTH) and store.token_info["grid"] == 1
    np.testing.assert_allclose(tokens[:, 0], _all_tokens(data["resnet"])[:PER_SHARD, 0])
    np.testing.assert_allclose(tokens[:, 1], tokens[:, 0], rtol=2e-3, atol=1e-3)


def test_tokens_are_the_original_images_when_views_are_stored(data, tmp_path):
    spec = shard_spec(data["root"] / "shards", 1)
    store = _extract(spec, tmp_path / "s", model_config=data["config"], views=2)
    assert store.num_views == 2 and store.tokens.shape == (PER_SHARD, VIT_TOKENS, VIT_WIDTH)
    expected = _all_tokens(data["vit"])[:PER_SHARD]
    np.testing.assert_allclose(_all_tokens(store), expected, rtol=1e-3, atol=1e-3)


def test_trainer_reads_tokens_from_the_stores(data):
    train = training_data_from_store(str(data["vit"].path))
    rows = train.token_rows(np.array([4, 0, 29]))
    assert rows.dtype == torch.float32 and rows.shape == (3, VIT_TOKENS, VIT_WIDTH)
    torch.testing.assert_close(rows, torch.as_tensor(_all_tokens(data["vit"])[[4, 0, 29]]))
    assert train.token_projection[0].shape == (VIT_WIDTH, 32)
    val = eval_data_from_store(str(data["vit_grid"].path))
    assert val.tokens.shape == (N, 5, VIT_WIDTH)
    validate(train, val)
    plain = training_data_from_store(str(data["plain"].path))
    assert plain.tokens is None and plain.token_projection is None
    assert data["plain"].token_info is None and data["plain"].manifest["tokens"] is None
    with pytest.raises(UserInputError, match="no token features; extract the store with"):
        plain.token_rows(np.array([0]))


def test_validate_counts_token_rows(stores):
    train = training_data_from_store(str(stores / "train"))
    assert train.tokens is None
    train.tokens = np.zeros((len(train.labels) - 1, 3, 4), dtype=np.float16)
    with pytest.raises(
        UserInputError, match=rf"{stores / 'train'}: {len(train.labels) - 1} token rows but"
    ):
        validate(train)


def test_tokens_round_trip_through_from_arrays(tmp_path):
    rng = np.random.default_rng(0)
    n, d, t, w = 70, 6, 3, 5
    tokens = rng.normal(size=(n, t, w)).astype(np.float32)
    projection = (rng.normal(size=(w, d)).astype(np.float32), np.ones(d, np.float32))
    store = FeatureStore.from_arrays(
        tmp_path / "s",
        rng.normal(size=(n, d)),
        rng.integers(0, 3, n),
        None,
        rng.normal(size=(3, d)),
        ["a", "b", "c"],
        None,
        3,
        samples_per_shard=32,
        tokens=tokens,
        token_projection=projection,
    )
    index = np.array([69, 0, 31, 32, 40])
    np.testing.assert_array_equal(store.tokens[index], tokens[index].astype(np.float16))
    assert store.token_info["count"] == t and store.token_info["width"] == w
    np.testing.assert_array_equal(store.token_projection[0], projection[0])
    assert len(store.manifest["shards"]) == 3
    assert all(len(shard["tokens_sha256"]) == 64 for shard in store.manifest["shards"])


def _extract_rank(rank: int, world_size: int, spec: str, output: str, config: str) -> dict:
    torch.set_num_threads(1)
    return extract(
        spec,
        output,
        pretrained="none",
        model_config=config,
        batch_size=1,
        workers=0,
        progress=False,
        tokens=True,
    )


def test_kill_then_resume_gives_identical_token_files(data, tmp_path):
    out = tmp_path / "store"
    args = (0, 1, data["spec"], str(out), str(data["config"]))
    records = out / "shards"
    done = kill_after_first_shard(_extract_rank, args, records, NUM_SHARDS)
    assert not (out / "manifest.json").exists()
    _extract_rank(*args)
    for name, mtime in done.items():
        assert (records / name).stat().st_mtime_ns == mtime  # finished shards not redone
    assert not list(records.glob(".*tmp*"))
    reference = data["vit"].path
    names = sorted(p.name for p in (reference / "shards").glob("*.tokens.npy"))
    assert (
        names == sorted(p.name for p in records.glob("*.tokens.npy")) and len(names) == NUM_SHARDS
    )
    for name in names:
        assert (records / name).read_bytes() == (reference / "shards" / name).read_bytes()
    for name in ("token_projection.npy", "token_projection_bias.npy"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == data["vit"].token_info


def test_two_ranks_write_the_tokens_of_one_process(data, tmp_path):
    out = tmp_path / "store"
    stats = run_in_processes(_extract_rank, 2, data["spec"], str(out), str(data["config"]))
    assert sum(s["shards_done"] for s in stats) == NUM_SHARDS and all(s["finalized"] for s in stats)
    store, reference = FeatureStore(out), data["vit"]
    assert store.token_info == reference.token_info and store.keys == reference.keys
    np.testing.assert_array_equal(_all_tokens(store), _all_tokens(reference))
    np.testing.assert_array_equal(store.token_projection[0], reference.token_projection[0])


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `candle-dist extract ARGV`."""
    capsys.readouterr()
    code = cli.main(["extract", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _one_error(lines: list[str]) -> str:
    assert len(lines) == 1 and lines[0].startswith("candle-dist extract: error: "), lines
    return lines[0]


def _avg_pool_config(folder: Path) -> Path:
    path = folder / "dataplane-avg.json"
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "pool_type": "avg"}}
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("model", "option", "message"),
    [
        (
            "vit",
            ["--token-grid", "2"],
            "--token-grid 2: pools the stored tokens, so it needs --tokens",
        ),
        ("vit", ["--tokens", "--token-grid", "0"], "--token-grid 0: give a whole number >= 1"),
        (
            "vit",
            ["--tokens", "--token-grid", "5"],
            "dataplane-tiny's patch grid is 4 x 4; give a whole number from 1 to 4",
        ),
        (
            "resnet",
            ["--tokens", "--token-grid", "3"],
            "tiny-clip's feature map is 2 x 2; give a whole number from 1 to 2",
        ),
        (
            "avg",
            ["--tokens"],
            "--tokens: dataplane-avg's image tower pools by 'avg', not its class token",
        ),
    ],
)
def test_bad_token_options_fail_before_anything_is_written(
    data, tmp_path, capsys, model, option, message
):
    models = {
        "vit": ["--model-config", str(data["config"])],
        "resnet": ["--model", "tiny-clip"],
        "avg": ["--model-config", str(_avg_pool_config(tmp_path))],
    }
    argv = ["--shards", shard_spec(data["root"] / "shards", 1), *models[model]]
    code, err = _cli(
        capsys, *argv, "--pretrained", "none", "--output", str(tmp_path / "s"), *option
    )
    assert code == 2 and message in _one_error(err)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("store", "option", "message"),
    [
        (
            "vit",
            ["--tokens", "--token-grid", "2"],
            "tokens --tokens (17 x 64) != --tokens --token-grid 2 (5 x 64)",
        ),
        ("vit", [], "tokens --tokens (17 x 64) != none (no --tokens)"),
        ("plain", ["--tokens"], "tokens none (no --tokens) != --tokens (17 x 64)"),
    ],
)
def test_other_token_setting_into_existing_store_is_refused(data, capsys, store, option, message):
    path = data[store].path
    before = (path / "extract.json").read_text()
    argv = ["--shards", data["spec"], "--model-config", str(data["config"]), "--pretrained", "none"]
    code, err = _cli(capsys, *argv, "--output", str(path), *option)
    line = _one_error(err)
    assert (
        code == 2 and f"store {path} (extract.json) and this extract command do not match" in line
    )
    assert message in line and f"delete {path} to start over" in line
    assert (path / "extract.json").read_text() == before


def test_help_states_the_storage_cost(capsys):
    with pytest.raises(SystemExit):
        cli.main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "197 tokens x 768 x 2 bytes = 132 GB" in text and "(50 tokens) = 34 GB" in text
    assert "437,513 images" in text and "--token-grid G" in text
