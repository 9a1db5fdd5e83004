"""Train several methods on the same feature stores and report them side by side.

Example:
  candle-dist compare --train features/train --val features/val \\
      --methods zero_shot candle_ce candle_cla --seeds 3 --output runs/compare
  candle-dist compare --train features/train --val features/val --methods all \\
      --set optim.epochs=5 --output runs/compare-short
  candle-dist compare --train features/train --val features/val \\
      --methods candle_cla my_methods/candle_tau2.yaml --output runs/compare

A method is a YAML config fragment (head, loss, sampler, second stage) in configs/methods/
(docs/compare.md lists them); an argument ending in .yaml is a method file of your own, named
by its file name. Each method trains once per seed 0..N-1 into OUTPUT/<method>/seed-<s>/, a
second-stage method from its first stage's run of the same seed (trained once, also when that
method is not listed). Printed: one table of mean ± std over seeds (sample std, ddof=1);
written: OUTPUT/compare.json and OUTPUT/compare.png. Rerun the same command to resume: runs
with final/ and eval.json are reused, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from candle_dist.config import Config, load_config
from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import MetricAccumulator, to_json
from candle_dist.eval.plots import plot_method_comparison
from candle_dist.model.losses import build_loss, loss_options
from candle_dist.outputs import check_output_dir
from candle_dist.train.data import (
    EvalData,
    TrainingData,
    eval_data_from_store,
    require_tokens,
    training_data_from_store,
    validate,
)
from candle_dist.train.seeds import summarize

# configs/ sits beside the package in a clone (and an editable install); a wheel does not ship it
METHODS_DIR = Path(__file__).resolve().parent.parent / "configs" / "methods"
METRICS = ("top1", "many", "medium", "few", "base", "new", "hm", "balanced_accuracy", "macro_f1")
KEYS = (*METRICS, "train_s")
NEW_CLASS_KEYS = ("base", "new", "hm")  # shown only when the store has classes without images
# set by compare for every run; a --set of them would be overwritten
PER_RUN_KEYS = (
    "train.output",
    "train.seed",
    "train.seeds",
    "stage2.from",
    "data.train",
    "data.val",
)
# what may differ between a finished run and the same run planned again (both are per-run paths)
NOT_COMPARED = {"train.output", "stage2.from"}
COMPARE_DEFAULTS = ("train.log_with=[]",)  # no TensorBoard files for dozens of runs
RUN_RECORD = "compare_run.json"  # beside a run's final/: its training seconds
STD_NOTE = "sample standard deviation over seeds (ddof=1); 0 with one seed"


@dataclass
class Method:
    """A method file: its config fragment without compare's own keys, and how it trains."""

    name: str
    path: Path
    raw: dict[str, Any]
    stage1: str | None = None  # the method whose run's final/ a second stage starts from
    zero_shot: bool = False  # no training: text features score the images


@dataclass
class Run:
    """One method at one seed: its full evaluation and where it came from."""

    method: str
    seed: int
    metrics: dict[str, Any]  # candle_dist.eval.metrics of the validation store
    train_s: float | None  # None: a reused run trained without a record of its time
    folder: Path | None  # None for zero-shot
    reused: bool = False


@dataclass
class Comparison:
    """What compare returns: compare.json's content and every run (stage-1 runs included)."""

    content: dict[str, Any]
    runs: dict[str, list[Run]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="training feature store")
    parser.add_argument("--val", required=True, help="validation feature store")
    parser.add_argument(
        "--methods",
        nargs="+",
        required=True,
        help="method names (configs/methods/NAME.yaml), 'all', or method file paths (*.yaml); "
        "spaces or commas between them",
    )
    parser.add_argument("--seeds", type=int, default=1, help="train seeds 0..N-1 of every method")
    parser.add_argument("--output", default="runs/compare", help="output folder")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides applied to every method, e.g. optim.epochs=5",
    )


def main(args: argparse.Namespace) -> int:
    from candle_dist.train.trainer import PREEMPTED_EXIT_CODE, Preempted

    output = check_output_dir(args.output, "--output")
    names = [name for entry in args.methods for name in entry.split(",") if name]
    if args.seeds < 1:
        raise UserInputError(f"--seeds {args.seeds}: give 1 or more seeds")
    train = training_data_from_store(str(Path(args.train).resolve()))
    val = eval_data_from_store(str(Path(args.val).resolve()))
    try:
        comparison = compare(
            train, val, names, output, seeds=range(args.seeds), overrides=args.overrides
        )
    except Preempted as stop:
        print(f"candle-dist compare: {stop}; rerun the same command to go on", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print()
    print("\n".join(table(comparison.content, train)))
    print(f"wrote {output / 'compare.json'}, {output / 'compare.png'} and the runs in {output}")
    return 0


def builtin_methods() -> dict[str, Path]:
    """The method files of configs/methods/ by name ({} where configs/ is not at hand)."""
    return {path.stem: path for path in sorted(METHODS_DIR.glob("*.yaml"))}


def read_method(name: str, path: Path) -> Method:
    """A method file, checked for what compare reads itself (`stage1`, `zero_shot`)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserInputError(f"method {name}: cannot read {path} ({err.strerror})") from None
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise UserInputError(f"method {name}: {path} is not valid YAML: {reason}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserInputError(f"method {name}: {path} must hold a mapping of config sections")
    stage1, zero_shot = raw.pop("stage1", None), raw.pop("zero_shot", False)
    if stage1 is not None and (not isinstance(stage1, str) or not stage1):
        raise UserInputError(f"method {name}: {path}: stage1 must name a method, got {stage1!r}")
    if not isinstance(zero_shot, bool):
        raise UserInputError(f"method {name}: {path}: zero_shot must be true or false")
    if zero_shot and (raw or stage1):
        raise UserInputError(
            f"method {name}: {path}: a zero_shot method trains nothing; remove its other keys"
        )
    return Method(name, path, raw, stage1, zero_shot)


def resolve_methods(entries: Sequence[str]) -> tuple[list[str], list[Method]]:
    """The table's method names (in the order given, each once) and every method to run, each
    first stage before the methods that start from it."""
    builtin = builtin_methods()
    given: dict[str, Path] = {}
    for entry in entries:
        # the baseline first, then by name: heads of one kind together
        names = sorted(builtin, key=lambda n: (n != "zero_shot", n)) if entry == "all" else [entry]
        for name in names:
            path = _method_path(name, builtin)
            name = path.stem
            if given.get(name, path) != path:
                raise UserInputError(
                    f"two methods are called {name}: {given[name]} and {path}; rename one file"
                )
            given[name] = path
    loaded: dict[str, Method] = {}

    def load(name: str, path: Path, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise UserInputError(f"methods start from each other: {' -> '.join((*chain, name))}")
        if name in loaded:
            if loaded[name].path != path:
                raise UserInputError(
                    f"two methods are called {name}: {loaded[name].path} and {path}; rename one"
                )
            return
        method = read_method(name, path)
        if method.stage1:
            load(method.stage1, _stage1_path(method, given, builtin), (*chain, name))
            if loaded[method.stage1].zero_shot:
                raise UserInputError(
                    f"method {name} ({path}) starts from stage1: {method.stage1}, which trains "
                    "nothing; name a trained method"
                )
        loaded[name] = method

    for name, path in given.items():
        load(name, path, ())
    return list(given), list(loaded.values())


def _method_path(entry: str, builtin: dict[str, Path]) -> Path:
    if entry.endswith((".yaml", ".yml")):
        path = Path(entry)
        if not path.is_file():
            raise UserInputError(f"method file {entry} does not exist")
        return path.resolve()
    if entry in builtin:
        return builtin[entry]
    if not builtin:
        raise UserInputError(
            f"unknown method {entry!r}: no method files in {METHODS_DIR} (configs/ comes with a "
            "clone of the repository; install it with pip install -e .), or give a file path"
        )
    raise UserInputError(
        f"unknown method {entry!r}: choose from {', '.join(builtin)}, all, or a method file "
        "path (NAME.yaml)"
    )


def _stage1_path(method: Method, given: dict[str, Path], builtin: dict[str, Path]) -> Path:
    """A stage1 name is looked up among the methods given, beside its method's file, and in
    configs/methods/, in that order."""
    name = method.stage1
    beside = method.path.parent / f"{name}.yaml"
    path = given.get(name) or (beside.resolve() if beside.is_file() else builtin.get(name))
    if path is None:
        raise UserInputError(
            f"method {method.name} ({method.path}) starts from stage1: {name}, which is not a "
            f"method: no {beside}, and not one of {', '.join(builtin) or 'the listed methods'}"
        )
    return path


def check_overrides(overrides: Sequence[str]) -> None:
    """Each --set on its own: a known key with a usable value, and not one compare sets."""
    for item in overrides:
        key = item.partition("=")[0]
        if key in PER_RUN_KEYS:
            raise UserInputError(
                f"--set {item}: compare sets {key} for every run (OUTPUT/<method>/seed-<s>, "
                "--seeds, --train, --val); use those options instead"
            )
        try:
            load_config(None, [item])
        except UserInputError as err:
            raise UserInputError(f"--set {item}: {str(err).removeprefix('defaults: ')}") from None


def method_config(method: Method, overrides: Sequence[str]) -> Config:
    """The method's Config with compare's defaults and `overrides` on top; errors name the
    method and its file."""
    where = f"method {method.name} ({method.path})"
    try:
        return load_config(method.raw, [*COMPARE_DEFAULTS, *overrides], source=where)
    except UserInputError as err:
        message = str(err)
        raise UserInputError(
            message if message.startswith(where) else f"{where}: {message}"
        ) from None


def compare(
    train: TrainingData,
    val: EvalData,
    methods: Sequence[str],
    output: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    announce: Callable[[str], None] = print,
) -> Comparison:
    """Train (or reuse) every method at every seed on `train`, evaluate on `val`, and write
    OUTPUT/compare.json and OUTPUT/compare.png.

    Everything that can be refused (method files, --set values, a decoder without token
    features, a loss the counts do not allow, a finished run made with other settings) is
    refused before the first run trains.
    """
    output = check_output_dir(output, "--output")
    seeds = list(seeds)
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserInputError(f"seeds {seeds}: give one or more different seeds, each >= 0")
    check_overrides(overrides)
    names, plan = resolve_methods(methods)
    by_name = {method.name: method for method in plan}
    validate(train, val)
    configs = {m.name: method_config(m, overrides) for m in plan if not m.zero_shot}
    jobs = []  # (method, seed, its folder, its config); zero-shot once, whatever the seeds
    for method in plan:
        if method.zero_shot:
            jobs.append((method, None, None, None))
            continue
        _check_runnable(method, configs[method.name], train, val)
        for seed in seeds:
            folder = output / method.name / f"seed-{seed}"
            cfg = _run_config(configs[method.name], method, seed, folder, output, train, val)
            _check_earlier_run(method.name, folder, cfg)
            jobs.append((method, seed, folder, cfg))

    runs: dict[str, list[Run]] = {m.name: [] for m in plan}
    for number, (method, seed, folder, cfg) in enumerate(jobs, start=1):
        if cfg is None:
            announce(f"[{number}/{len(jobs)}] {method.name}: text features, no training")
            metrics = zero_shot_metrics(train, val)
            runs[method.name] = [Run(method.name, s, metrics, 0.0, None) for s in seeds]
            continue
        label = f"[{number}/{len(jobs)}] {method.name} seed {seed}"
        run = _train(method, seed, folder, cfg, train, val, label, announce)
        if method.stage1:  # the cost of the method is both stages'
            first = runs[method.stage1][seeds.index(seed)].train_s
            run.train_s = None if first is None or run.train_s is None else first + run.train_s
        runs[method.name].append(run)

    content = {
        "train": train.source,
        "val": val.source,
        "overrides": list(overrides),
        "seeds": seeds,
        "std": STD_NOTE,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "methods": {name: _summary(by_name[name], runs[name]) for name in names},
    }
    to_json(content, output / "compare.json")
    several = f" (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    title = f"Accuracy by method{several}"
    plot_method_comparison(content["methods"], output / "compare.png", title=title)
    return Comparison(content, runs)


def _run_config(
    template: Config,
    method: Method,
    seed: int,
    folder: Path,
    output: Path,
    train: TrainingData,
    val: EvalData,
) -> Config:
    """The method's config for one seed: its folder, seed, stores and first-stage run."""
    cfg = copy.deepcopy(template)
    cfg.train.output, cfg.train.seed, cfg.train.seeds = str(folder), seed, []
    cfg.data.train, cfg.data.val = train.source, val.source
    if method.stage1:
        cfg.stage2.source = str(output / method.stage1 / f"seed-{seed}" / "final")
    cfg.validate()
    return cfg


def _check_runnable(method: Method, cfg: Config, train: TrainingData, val: EvalData) -> None:
    """What the trainer would refuse only after earlier methods trained: a decoder without
    token features, a loss these counts do not allow."""
    try:
        if cfg.head.type == "decoder":
            for split in (train, val):
                require_tokens(split.tokens, split.source)
        options = {name: getattr(cfg.loss, name) for name in loss_options(cfg.loss.name)}
        build_loss(cfg.loss.name, train.counts, **options)
    except UserInputError as err:
        raise UserInputError(f"method {method.name} ({method.path}): {err}") from None


def _check_earlier_run(name: str, folder: Path, cfg: Config) -> None:
    """A run already in `folder` (finished or not) must have been made with this config:
    reusing or continuing it otherwise would report one setting under another's name."""
    recorded_path = folder / "config.json"
    if not recorded_path.is_file():
        return
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    planned = json.loads(json.dumps(cfg.to_dict()))
    differences = [
        f"{section}.{key} {recorded.get(section, {}).get(key, 'unset')!r} there, {value!r} now"
        for section, values in planned.items()
        for key, value in values.items()
        if f"{section}.{key}" not in NOT_COMPARED
        and recorded.get(section, {}).get(key, "unset") != value
    ]
    if differences:
        raise UserInputError(
            f"method {name}: {folder} holds a run made with other settings "
            f"({'; '.join(differences[:3])}); rerun with the same --set options, or choose "
            "another --output"
        )


def _train(
    method: Method,
    seed: int,
    folder: Path,
    cfg: Config,
    train: TrainingData,
    val: EvalData,
    label: str,
    announce: Callable[[str], None],
) -> Run:
    """Reuse the finished run in `folder`, or train it (continuing from a checkpoint)."""
    from candle_dist.train.trainer import fit

    if (folder / "final").is_dir() and (folder / "eval.json").is_file():
        announce(f"{label}: reusing {folder} (final/ and eval.json exist)")
        metrics = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        try:
            train_s = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))["train_s"]
        except (OSError, ValueError, KeyError):
            train_s = None
        return Run(method.name, seed, metrics, train_s, folder, reused=True)
    announce(f"{label}: training into {folder}")
    start = time.perf_counter()
    try:
        results = fit(cfg, train, val, resume=(folder / "checkpoints").is_dir())
    except UserInputError as err:
        raise UserInputError(f"method {method.name}, seed {seed}: {err}") from None
    train_s = time.perf_counter() - start
    to_json({"method": method.name, "seed": seed, "train_s": train_s}, folder / RUN_RECORD)
    return Run(method.name, seed, results["eval"], train_s, folder)


@torch.no_grad()
def zero_shot_metrics(train: TrainingData, val: EvalData, batch_size: int = 4096) -> dict:
    """CLIP's zero-shot: logit scale x cosine of image and class text features, in batches."""
    text = F.normalize(train.text_features.float(), dim=-1).t()
    scale = float(np.exp(train.logit_scale))
    accumulator = MetricAccumulator(train.counts, train.num_base_classes)
    for start in range(0, len(val.labels), batch_size):
        rows = np.asarray(val.features[start : start + batch_size], dtype=np.float32)
        scores = scale * F.normalize(torch.as_tensor(rows), dim=-1) @ text
        accumulator.update(scores, val.labels[start : start + batch_size])
    return accumulator.compute()


def _summary(method: Method, runs: list[Run]) -> dict[str, Any]:
    """compare.json's entry of a method: KEY (mean over seeds), KEY_std, and every seed's row."""
    rows = {
        run.seed: {**{k: run.metrics.get(k) for k in METRICS}, "train_s": run.train_s}
        for run in runs
    }
    stats = summarize(rows)
    entry: dict[str, Any] = {"method_file": str(method.path), "stage1": method.stage1}
    for key in KEYS:
        entry[key] = stats[key]["mean"] if key in stats else None
        entry[f"{key}_std"] = stats[key]["std"] if key in stats else None
    entry["seeds"] = [
        {
            "seed": run.seed,
            **rows[run.seed],
            "run": None if run.folder is None else str(run.folder),
            "reused": run.reused,
        }
        for run in runs
    ]
    return entry


def columns(train: TrainingData) -> list[str]:
    """The table's columns: base/new/hm only when the store has classes known by name only."""
    has_new = train.num_base_classes < train.num_classes
    return [key for key in KEYS if has_new or key not in NEW_CLASS_KEYS]


def format_cell(entry: dict[str, Any], key: str, several: bool, joiner: str = "±") -> str:
    """A method's mean (with its std after `joiner` when there are several seeds): 4 decimals,
    seconds to 1; '-' for a group without classes."""
    mean, std = entry[key], entry[f"{key}_std"]
    if mean is None:
        return "-"
    digits = 1 if key == "train_s" else 4
    return f"{mean:.{digits}f}" + (f"{joiner}{std:.{digits}f}" if several else "")


def table(content: dict[str, Any], train: TrainingData) -> list[str]:
    """The printed comparison: a line on the task, then one row per method."""
    keys, seeds = columns(train), len(content["seeds"])
    rows = [["method", *keys]]
    rows += [
        [name, *(format_cell(entry, key, seeds > 1) for key in keys)]
        for name, entry in content["methods"].items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    about = f"mean±std over {seeds} seeds (sample std, ddof=1)" if seeds > 1 else "1 seed"
    lines = [
        f"{train.num_classes} classes ({train.num_classes - train.num_base_classes} new), "
        f"{len(train.labels)} training images; {about}; train_s in seconds"
    ]
    for row in rows:
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *cells[1:]]))
    return lines
