"""The trainer with head.type=linear and decoder, and the second stages (crt, lws, disalign,
marc) from a trained run: P = 1, 2 and 3 train the same head; stage 2 leaves the representation
as stage 1 left it; eval scores a decoder run from token features and applies tau_norm; every
mismatch is one clear error."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from candle_dist.config import load_config
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.errors import UserInputError
from candle_dist.train.data import training_data_from_synthetic
from candle_dist.train.trainer import fit
from tests.dist_utils import run_in_processes

C, D, T = 12, 16, 4
COMMON = [
    "optim.batch_size=7",  # a rank without images at P = 3 on the last batch
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "optim.lr=0.05",
    "head.depth=2",
    "head.chunk_rows=5",
    "train.log_every=1",
    "train.eval_batch_size=5",
    "train.eval_every_epoch=true",
    "train.log_with=[]",
]


def _data():
    """Synthetic features with tokens: token 0 is the feature, the others it plus noise; the
    projection the identity (so the untrained decoder scores as zero-shot)."""
    synthetic = make_synthetic_features(
        C, D, num_new=3, max_count=7, imbalance_ratio=7.0, val_per_class=2, seed=0
    )
    train, val = training_data_from_synthetic(synthetic)
    g = np.random.default_rng(0)
    for split in (train, val):
        features = np.asarray(split.features, dtype=np.float32)
        noise = g.normal(0, 0.3, (len(features), T, D)).astype(np.float32)
        noise[:, 0] = 0
        split.tokens = (features[:, None, :] + noise).astype(np.float16)
    train.token_projection = (np.eye(D, dtype=np.float32), np.zeros(D, dtype=np.float32))
    return train, val


def _cfg(output, *overrides):
    return load_config(None, [*COMMON, f"train.output={output}", *overrides])


def _fit_worker(rank: int, world_size: int, jobs: list[tuple[str, list[str]]]) -> list[dict]:
    train, val = _data()
    results = [fit(_cfg(output, *overrides), train, val) for output, overrides in jobs]
    assert not dist.is_initialized() or dist.get_world_size() == world_size
    return results


def _jobs(root) -> list[tuple[str, list[str]]]:
    first = str(root / "decoder")
    return [
        (first, ["head.type=decoder", "loss.name=ldam", "loss.count_offset=1"]),
        (str(root / "lws"), ["head.type=decoder", f"stage2.from={first}/final",
                             "stage2.method=lws", "train.sampler=class_balanced"]),
        (str(root / "linear"), ["head.type=linear", "head.init=random", "loss.name=lade",
                                 "loss.count_offset=1"]),
    ]  # fmt: skip


def _state(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "final" / "head.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("baselines")
    out = {}
    for world in (1, 2, 3):
        folder = root / f"p{world}"
        results = run_in_processes(_fit_worker, world, _jobs(folder), init_group=False)
        out[world] = (folder, results[0])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_class_parallel_runs_equal_one_process(runs, world):
    ref_folder, ref = runs[1]
    folder, mine = runs[world]
    for name, ref_result, result in zip(("decoder", "lws", "linear"), ref, mine, strict=True):
        assert result["eval"]["top1"] == ref_result["eval"]["top1"], name
        assert result["eval"]["eval_loss"] == pytest.approx(ref_result["eval"]["eval_loss"], 1e-5)
        a, b = _state(folder / name), _state(ref_folder / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (name, key)


def test_stage2_trains_only_its_calibration(runs):
    folder, _ = runs[1]
    first, second = _state(folder / "decoder"), _state(folder / "lws")
    for key, value in first.items():
        assert torch.equal(second[key], value), key  # decoder and classifier frozen
    assert not torch.equal(second["class_scale"], torch.ones(C))
    meta = json.loads((folder / "lws" / "final" / "head_meta.json").read_text())
    assert meta["head_type"] == "decoder"
    assert meta["head_options"]["calibration"] == "lws"
    assert meta["stage2"]["method"] == "lws"
    assert not (folder / "lws" / "final" / "classifier.pt").exists()


@pytest.mark.parametrize("method", ["crt", "disalign", "marc"])
def test_other_stage2_methods(runs, tmp_path, method):
    folder, _ = runs[1]
    train, val = _data()
    cfg = _cfg(
        tmp_path / method,
        "head.type=decoder",
        f"stage2.from={folder / 'decoder' / 'final'}",
        f"stage2.method={method}",
        "loss.name=grw",
        "loss.count_offset=1",
    )
    result = fit(cfg, train, val)
    assert 0 <= result["eval"]["top1"] <= 1
    first, second = _state(folder / "decoder"), _state(tmp_path / method)
    decoder = [k for k in first if k.startswith("decoder.")]
    assert decoder and all(torch.equal(first[k], second[k]) for k in decoder)
    assert torch.equal(first["weight"], second["weight"]) == (method != "crt")


def test_decoder_starts_at_zero_shot(tmp_path):
    """One step at a learning rate of ~0 leaves the decoder where it started: zero-shot."""
    train, val = _data()
    cfg = _cfg(tmp_path / "z", "head.type=decoder", "optim.epochs=1", "optim.lr=1e-12")
    metrics = fit(cfg, train, val)["eval"]
    feats = torch.nn.functional.normalize(torch.as_tensor(np.asarray(val.features)), dim=-1)
    text = torch.nn.functional.normalize(train.text_features, dim=-1)
    zero_shot = (feats @ text.t()).argmax(1).numpy()
    assert metrics["top1"] == pytest.approx(float(np.mean(zero_shot == val.labels)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["head.type=decoder", "stage2.from=NOWHERE"], "stage2.from=NOWHERE: NOWHERE/head_meta"),
        (["head.type=linear", "stage2.from=RUN"], "holds a decoder head but head.type=linear"),
        (["head.type=decoder", "stage2.from=CANDLE"], "holds a candle head; stage 2"),
        (["head.type=decoder", "stage2.from=LWS"], "is itself a second-stage (lws) run"),
        (["head.type=linear", "train.class_sample_fraction=0.5"], "is for the candle head"),
        (["head.type=decoder", "head.decoder_heads=3"], "head.decoder_heads=3"),
        (["head.type=transformer"], "unknown head.type='transformer': choose one of candle"),
        (["stage2.method=tau"], "unknown stage2.method='tau': choose one of crt, lws"),
    ],
)
def test_bad_head_and_stage2_settings_are_clear_errors(runs, tmp_path, overrides, message):
    folder, _ = runs[1]
    train, val = _data()
    candle = tmp_path / "candle"
    fit(_cfg(candle, "optim.epochs=1", "train.eval_every_epoch=false"), train, None)
    places = {
        "RUN": folder / "decoder" / "final",
        "CANDLE": candle / "final",
        "LWS": folder / "lws" / "final",
    }
    for placeholder, place in places.items():
        overrides = [o.replace(f"={placeholder}", f"={place}") for o in overrides]
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit(_cfg(tmp_path / "run", *overrides), train, val)
    assert not (tmp_path / "run" / "final").exists()


def test_stage2_on_another_class_list_is_a_clear_error(runs, tmp_path):
    folder, _ = runs[1]
    other = make_synthetic_features(C + 2, D, num_new=3, max_count=7, imbalance_ratio=7.0, seed=0)
    train, _ = training_data_from_synthetic(other)
    train.tokens = np.zeros((len(train.labels), T, D), dtype=np.float16)
    cfg = _cfg(tmp_path / "x", "head.type=decoder", f"stage2.from={folder / 'decoder/final'}")
    with pytest.raises(UserInputError, match=f"trained on {C} classes but synthetic has {C + 2}"):
        fit(cfg, train, None)


def test_decoder_without_tokens_names_the_extract_flag(tmp_path):
    train, val = training_data_from_synthetic(
        make_synthetic_features(C, D, num_new=3, max_count=7, imbalance_ratio=7.0, seed=0)
    )
    with pytest.raises(UserInputError, match="extract --tokens"):
        fit(_cfg(tmp_path / "x", "head.type=decoder"), train, val)


def test_eval_scores_a_decoder_run_from_tokens_and_applies_tau_norm(runs, tmp_path, capsys):
    from candle_dist.cli import main
    from candle_dist.features.store import FeatureStore

    folder, _ = runs[1]
    train, val = _data()
    FeatureStore.from_arrays(
        tmp_path / "val", np.asarray(val.features), val.labels, None,
        train.text_features.numpy(), train.classnames, None, train.num_base_classes,
        tokens=val.tokens, token_projection=train.token_projection,
    )  # fmt: skip
    run = folder / "decoder" / "final"
    args = ["eval", "--checkpoint", str(run), "--features", str(tmp_path / "val")]
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    recorded = json.loads((folder / "decoder" / "eval.json").read_text())
    assert plain["top1"] == recorded["top1"]
    assert main([*args, "--output", str(tmp_path / "tau"), "--adjust", "tau_norm=1"]) == 0
    tau = json.loads((tmp_path / "tau" / "metrics.json").read_text())
    assert tau["adjust"] == "tau_norm=1"
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "bad"), "--adjust", "norm=1"]) == 2
    assert "use logit=TAU or tau_norm=TAU" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "val")


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "--checkpoint", "RUN", "x.npy"],
        ["export", "RUN", "--output", "OUT"],
        ["add-classes", "RUN", "--names", "n.txt", "--output", "OUT"],
    ],
    ids=lambda c: c[0],
)
def test_commands_of_the_exported_classifier_refuse_a_decoder_run(runs, tmp_path, capsys, command):
    from candle_dist.cli import main

    run = runs[1][0] / "decoder" / "final"
    (tmp_path / "n.txt").write_text("a new class\n")
    argv = [
        str(run) if a == "RUN" else str(tmp_path / a) if a in ("OUT", "n.txt") else a
        for a in command
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a decoder head" in err[0] and "candle-dist eval" in err[0]
    assert not (tmp_path / "OUT").exists()
