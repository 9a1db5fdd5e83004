"""`candle-dist compare`: one table, compare.json (mean and sample std of the per-seed runs) and a
plot; a rerun reuses finished runs; bad method names, method files and --set values are one
error line before anything trains; the method files and docs/compare.md agree."""

import contextlib
import io
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from candle_dist.cli import main
from candle_dist.compare import KEYS, METHODS_DIR, builtin_methods, compare, resolve_methods
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.eval.metrics import evaluate
from candle_dist.train.data import training_data_from_synthetic

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["optim.epochs=1", "head.num_heads=4"]


def _compare(stores, output, *args: str) -> tuple[int, str]:
    """Run the CLI; its exit status and stdout."""
    argv = ["compare", "--train", str(stores / "train"), "--val", str(stores / "val")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--output", str(output), *args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def compared(stores, tmp_path_factory):
    torch.set_num_threads(2)
    output = tmp_path_factory.mktemp("compare")
    args = ["--methods", "zero_shot,candle_ce", "--seeds", "2", "--set", *QUICK]
    code, printed = _compare(stores, output, *args)
    assert code == 0
    return output, args, printed


def test_table_json_and_plot(compared, stores):
    output, _, printed = compared
    lines = printed.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert lines[header].split() == ["method", *KEYS]  # the store has new classes: base/new/hm
    assert "30 classes (6 new)" in lines[header - 1] and "ddof=1" in lines[header - 1]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1 : header + 3]}
    assert list(rows) == ["zero_shot", "candle_ce"]
    assert rows["candle_ce"][1] == "-"  # no class has more than 100 images: many is empty
    assert re.fullmatch(r"0\.\d{4}±0\.\d{4}", rows["candle_ce"][0])
    assert lines[-1].startswith(f"wrote {output / 'compare.json'}")

    content = json.loads((output / "compare.json").read_text())
    assert content["seeds"] == [0, 1] and content["overrides"] == QUICK
    assert content["train"] == str((stores / "train").resolve()) and content["date"]
    assert list(content["methods"]) == ["zero_shot", "candle_ce"]
    entry = content["methods"]["candle_ce"]
    evals = [
        json.loads((output / "candle_ce" / f"seed-{s}" / "eval.json").read_text()) for s in (0, 1)
    ]
    assert evals[0]["top1"] != evals[1]["top1"] or evals[0]["hm"] != evals[1]["hm"]
    for key in KEYS:
        assert f"{key}_std" in entry
        if key in ("many", "train_s"):
            continue
        values = [e[key] for e in evals]
        assert entry[key] == pytest.approx(statistics.fmean(values))
        assert entry[f"{key}_std"] == pytest.approx(statistics.stdev(values))
        assert [row[key] for row in entry["seeds"]] == values
    assert entry["many"] is None and entry["many_std"] is None
    assert all(row["train_s"] > 0 and not row["reused"] for row in entry["seeds"])
    zero = content["methods"]["zero_shot"]
    assert zero["top1_std"] == 0.0 and zero["train_s"] == 0.0
    assert (output / "compare.png").stat().st_size > 1000


def test_zero_shot_is_clip_text_scoring(compared, stores):
    from candle_dist.train.data import eval_data_from_store, training_data_from_store

    train = training_data_from_store(str(stores / "train"))
    val = eval_data_from_store(str(stores / "val"))
    features = torch.nn.functional.normalize(torch.as_tensor(np.asarray(val.features[:])), dim=-1)
    text = torch.nn.functional.normalize(train.text_features, dim=-1)
    expected = evaluate(features @ text.t(), val.labels, train.counts, train.num_base_classes)
    got = json.loads((compared[0] / "compare.json").read_text())["methods"]["zero_shot"]
    for key in ("top1", "base", "new", "hm", "few", "macro_f1"):
        assert got[key] == pytest.approx(expected[key]), key


def test_rerun_reuses_finished_runs_and_refuses_other_settings(compared, stores, capsys):
    output, args, _ = compared
    eval_json = output / "candle_ce" / "seed-1" / "eval.json"
    before = (eval_json.stat().st_mtime_ns, json.loads((output / "compare.json").read_text()))
    code, printed = _compare(stores, output, *args)
    assert code == 0
    assert printed.count("reusing") == 2 and "training into" not in printed
    after = json.loads((output / "compare.json").read_text())
    assert eval_json.stat().st_mtime_ns == before[0]
    assert after["methods"]["candle_ce"]["top1"] == before[1]["methods"]["candle_ce"]["top1"]
    assert all(row["reused"] for row in after["methods"]["candle_ce"]["seeds"])
    assert after["methods"]["candle_ce"]["train_s"] == before[1]["methods"]["candle_ce"]["train_s"]

    capsys.readouterr()
    code, _ = _compare(stores, output, *args[:-2], "optim.epochs=2", "head.num_heads=4")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "holds a run made with other settings (optim.epochs 1 there, 2 now)" in err[0]


def _one_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("candle-dist compare: error: "), err
    for part in parts:
        assert part in err[0], (part, err[0])
    return err[0]


def test_unknown_method_lists_the_valid_ones(stores, tmp_path, capsys):
    code, _ = _compare(stores, tmp_path / "out", "--methods", "candle_ce", "candle_clla")
    assert code == 2
    line = _one_error(capsys, "unknown method 'candle_clla'")
    assert all(name in line for name in builtin_methods())
    assert not (tmp_path / "out").exists()


def test_stage2_method_whose_stage1_is_missing(stores, tmp_path, capsys):
    method = tmp_path / "my_crt.yaml"
    method.write_text("stage1: decoder_cee\nstage2:\n  method: crt\n")
    code, _ = _compare(stores, tmp_path / "out", "--methods", "zero_shot", str(method))
    assert code == 2
    _one_error(capsys, "method my_crt", "stage1: decoder_cee", "which is not a method")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.learning_rate=0.1", "--set optim.learning_rate=0.1: unknown key(s) learning_rate"),
        ("optim.lr=-1", "--set optim.lr=-1: optim.lr=-1.0 must be positive"),
        ("train.seed=3", "--set train.seed=3: compare sets train.seed for every run"),
    ],
)
def test_bad_override_is_one_error_line(stores, tmp_path, capsys, override, message):
    code, _ = _compare(stores, tmp_path / "out", "--methods", "candle_ce", "--set", override)
    assert code == 2
    _one_error(capsys, message)
    assert not (tmp_path / "out").exists()


def test_bad_method_file_names_the_method_and_file(stores, tmp_path, capsys):
    method = tmp_path / "broken.yaml"
    method.write_text("head:\n  type: candle\nloss:\n  nme: cla\n")
    code, _ = _compare(stores, tmp_path / "out", "--methods", "candle_ce", str(method))
    assert code == 2
    _one_error(
        capsys, f"method broken ({method.resolve()})", "unknown key(s) nme in section 'loss'"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a": "stage1: b\n", "b": "stage1: a\n"}, "methods start from each other: a -> b -> a"),
        ({"a": "stage1: zero_shot\n"}, "stage1: zero_shot, which trains nothing"),
        ({"a": "zero_shot: true\nloss:\n  name: cla\n"}, "a zero_shot method trains nothing"),
        ({"a": "- head\n"}, "must hold a mapping of config sections"),
        ({"a": "head: [\n"}, "is not valid YAML"),
    ],
)
def test_method_files_that_cannot_run(tmp_path, files, message):
    from candle_dist.errors import UserInputError

    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    with pytest.raises(UserInputError, match=re.escape(message)) as raised:
        resolve_methods([str(tmp_path / "a.yaml"), "candle_ce", str(tmp_path / "a.yaml")])
    assert "\n" not in str(raised.value)


def test_user_method_file_trains_beside_the_builtin_ones(stores, tmp_path):
    method = tmp_path / "candle_tau2.yaml"
    method.write_text(
        "# Candle, CLA with tau 2\nhead:\n  type: candle\nloss:\n  name: cla\n  tau: 2.0\n"
    )
    code, printed = _compare(stores, tmp_path / "out", "--methods", str(method), "--set", *QUICK)
    assert code == 0 and "candle_tau2 " in printed and "±" not in printed
    config = json.loads((tmp_path / "out" / "candle_tau2" / "seed-0" / "config.json").read_text())
    assert config["loss"]["tau"] == 2.0 and config["train"]["log_with"] == []


def test_method_files_resolve_and_docs_list_every_one():
    names, plan = resolve_methods(["all"])
    assert names[0] == "zero_shot" and set(names) == set(builtin_methods())
    required = {
        "zero_shot", "linear_ce", "linear_la", "decoder_ce", "decoder_bs", "decoder_ldam",
        "decoder_lade", "decoder_crt", "decoder_lws", "decoder_disalign", "decoder_marc",
        "candle_ce", "candle_cla", "candle_ldam", "candle_lade",
    }  # fmt: skip
    assert required <= set(names)
    order = [method.name for method in plan]
    for method in plan:
        assert method.path.read_text().startswith("# "), method.path  # what it is, which paper
        if method.stage1:
            assert order.index(method.stage1) < order.index(method.name)
    docs = (ROOT / "docs" / "compare.md").read_text()
    for name in names:
        assert f"| `{name}` |" in docs, name
    assert METHODS_DIR == ROOT / "configs" / "methods"


def test_every_method_file_builds_a_valid_config(tmp_path):
    from candle_dist.compare import method_config

    _, plan = resolve_methods(["all"])
    for method in plan:
        if not method.zero_shot:
            cfg = method_config(method, QUICK)
            assert cfg.head.type in ("candle", "linear", "decoder"), method.name


def test_decoder_on_a_store_without_tokens_stops_before_training(stores, tmp_path, capsys):
    code, _ = _compare(
        stores, tmp_path / "out", "--methods", "candle_ce", "decoder_crt", "--set", *QUICK
    )
    assert code == 2
    _one_error(capsys, "method decoder_ce", "extract --tokens")
    assert not (tmp_path / "out").exists()


def test_linear_and_a_second_stage_from_its_first_stage(tmp_path):
    synthetic = make_synthetic_features(
        12, 16, num_new=3, max_count=12, imbalance_ratio=6, val_per_class=3, seed=1, num_tokens=3
    )
    train, val = training_data_from_synthetic(synthetic)
    train.tokens, val.tokens = synthetic.train_tokens.numpy(), synthetic.val_tokens.numpy()
    train.token_projection = tuple(t.numpy() for t in synthetic.token_projection)
    overrides = ["optim.epochs=1", "optim.batch_size=16", "head.depth=1"]
    output = tmp_path / "out"
    result = compare(
        train, val, ["linear_ce", "decoder_crt"], output, seeds=[0], overrides=overrides
    )
    assert list(result.content["methods"]) == ["linear_ce", "decoder_crt"]
    first, second = result.runs["decoder_ce"][0], result.runs["decoder_crt"][0]
    config = json.loads((output / "decoder_crt" / "seed-0" / "config.json").read_text())
    assert config["stage2"]["from"] == str(output / "decoder_ce" / "seed-0" / "final")
    assert config["stage2"]["method"] == "crt" and config["train"]["sampler"] == "class_balanced"
    assert second.train_s > first.train_s > 0  # a second stage costs both stages
    again = compare(train, val, ["decoder_crt"], output, seeds=[0], overrides=overrides)
    assert all(run.reused for runs in again.runs.values() for run in runs)
