"""The train and eval subcommands on feature stores, and their one-line errors on bad input."""

import json

import pytest
import torch

from candle_dist.cli import COMMANDS, main, subcommand_parser


def test_train_then_eval(stores, tmp_path, capsys):
    torch.set_num_threads(2)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            f"data.train={stores / 'train'}",
            f"data.val={stores / 'val'}",
            f"train.output={run}",
            "optim.epochs=2",
            "head.num_heads=4",
        ]
    )
    assert code == 0
    assert "top1" in capsys.readouterr().out
    for name in ("head.pt", "head_meta.json", "classifier.pt"):
        assert (run / "final" / name).exists()
    for exported in ([], ["--exported"]):
        out = tmp_path / f"eval{len(exported)}"
        code = main(
            [
                "eval",
                "--checkpoint",
                str(run / "final"),
                "--features",
                str(stores / "val"),
                "--output",
                str(out),
                *exported,
            ]
        )
        assert code == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert 0.0 <= metrics["top1"] <= 1.0 and metrics["new"] is not None
        assert (out / "per_class_accuracy.png").exists()
    training = json.loads((run / "eval.json").read_text())
    evaluated = json.loads((tmp_path / "eval0" / "metrics.json").read_text())
    assert training["top1"] == pytest.approx(evaluated["top1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "data.train=/nonexistent/store"], "/nonexistent/store"),
        (["train", "optim.learning_rate=0.1"], "learning_rate"),
        (["eval", "--checkpoint", "/nonexistent", "--features", "/nonexistent"], "nonexistent"),
        (["eval", "--checkpoint", "x", "--features", "y", "--device", "tpu"], "cuda:N"),
        (["eval", "--checkpoint", "x", "--features", "y", "--device", "cuda:3"], "--device cpu"),
    ],
)
def test_bad_input_is_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("candle-dist ") and "error:" in err[0]
    assert message in err[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=fp16", "train.precision='fp16': choose one of auto, bf16, fp32"),
        ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes=0.0 must be positive"),
    ],
)
def test_bad_precision_or_timeout_is_one_error_line(stores, tmp_path, override, message, capsys):
    argv = ["train", f"data.train={stores / 'train'}", f"train.output={tmp_path}", override]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_eval_with_a_foreign_checkpoint(stores, tmp_path, capsys):
    final = tmp_path / "final"
    final.mkdir()
    (final / "head_meta.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, final / "head.pt")
    assert main(["eval", "--checkpoint", str(final), "--features", str(stores / "val")]) == 2
    assert "not a valid candle_dist checkpoint" in capsys.readouterr().err


def test_predict_on_features_matches_the_exported_classifier(stores, tmp_path, capsys):
    import numpy as np

    from candle_dist.classifier import ExportedClassifier
    from candle_dist.features.store import FeatureStore as Store

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                f"data.train={stores / 'train'}",
                f"train.output={run}",
                "optim.epochs=1",
                "head.num_heads=4",
            ]
        )
        == 0
    )
    val = Store(stores / "val")
    feats = np.asarray(val.features[:7], dtype=np.float32)
    np.save(tmp_path / "feats.npy", feats)
    out = tmp_path / "pred.jsonl"
    args = ["predict", "--checkpoint", str(run / "final"), "--top-k", "3", "--output", str(out)]
    assert main([*args, str(tmp_path / "feats.npy"), str(stores / "val")]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 7 + len(val)
    clf = ExportedClassifier.load(run / "final" / "classifier.pt")
    expected = clf.topk(torch.as_tensor(feats), 3)
    probs = torch.softmax(clf.scores(torch.as_tensor(feats)), dim=-1)
    for row, (record, top) in enumerate(zip(lines[:7], expected, strict=True)):
        assert [t["class"] for t in record["topk"]] == [c for c, _ in top]
        for entry in record["topk"]:
            assert clf.classnames[entry["id"]] == entry["class"]
            assert entry["prob"] == pytest.approx(float(probs[row, entry["id"]]), abs=1e-6)
    assert lines[7]["topk"][0]["class"] in val.classnames


@pytest.mark.parametrize("inputs", [["/nonexistent.npy"], ["/nonexistent/folder"]])
def test_predict_bad_input_is_one_error_line(stores, tmp_path, inputs, capsys):
    run = tmp_path / "run"
    main(
        [
            "train",
            f"data.train={stores / 'train'}",
            f"train.output={run}",
            "optim.epochs=1",
            "head.num_heads=4",
        ]
    )
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "final"), *inputs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert main(["predict", "--checkpoint", str(tmp_path), "x.npy"]) == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_text_and_says_its_default(name):
    parser = subcommand_parser(name)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help text"
        if action.nargs != 0:
            line = parser._get_formatter()._get_help_string(action)
            assert "default" in line.lower() or "(required)" in line, (name, line)


def test_train_summary_says_where_the_result_went_or_how_far_it_got(tmp_path):
    from candle_dist.train.cli import summary

    final = tmp_path / "x" / "final"
    final.mkdir(parents=True)
    for name in ("head.pt", "head_meta.json", "classifier.pt"):
        (final / name).write_text("")
    metrics = {k: 0.5 for k in ("top1", "base", "new", "hm", "medium", "few")} | {"many": None}
    done = summary({"steps": 8, "total_steps": 8, "eval": metrics, "final": str(final)})
    assert done.splitlines() == [
        "top1 0.5000  base 0.5000  new 0.5000  hm 0.5000  many -  medium 0.5000  few 0.5000",
        f"wrote {final} (classifier.pt, head.pt, head_meta.json)",
        f"metrics in {final.parent / 'eval.json'} and {final.parent / 'metrics.jsonl'}",
    ]
    (final / "classifier.pt").unlink()  # a decoder or linear run exports no classifier.pt
    assert f"wrote {final} (head.pt, head_meta.json)" in summary({"final": str(final)})
    partial = summary({"steps": 3, "total_steps": 8})
    assert partial == "stopped at step 3 of 8 (--max-steps); continue with --resume"


def test_train_several_seeds_reports_mean_and_std(stores, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", f"data.train={stores / 'train'}", f"data.val={stores / 'val'}"]
    argv += [f"train.output={run}", "optim.epochs=1", "head.num_heads=4", "train.seed=5"]
    assert main([*argv, "--seeds", "2"]) == 0
    content = json.loads((run / "seeds.json").read_text())
    assert content["seeds"] == [5, 6]
    top1 = [json.loads((run / f"seed-{s}" / "eval.json").read_text())["top1"] for s in (5, 6)]
    assert top1[0] != top1[1]  # the seeds differ (dropout, order)
    assert content["summary"]["top1"]["mean"] == pytest.approx(sum(top1) / 2)
    assert content["summary"]["top1"]["std"] == pytest.approx(abs(top1[0] - top1[1]) / 2**0.5)
    assert "2 seeds: top1 " in capsys.readouterr().out
