"""Adding classes by name after training vs declaring them at training time, on the demo's data.

python benchmarks/bench_add_classes.py [--classes 100 --new 20 --shots 5]

Synthetic long-tailed shards encoded by the offline tiny CLIP (as `candle-dist demo`). Run A
trains with the new classes declared from the start (known by name only); run B trains on the
base classes alone, and `candle-dist add-classes` then adds the new classes by name (and, in a
second variant, with `--shots` rendered images each). All classifiers score the same validation
images over all classes; printed: base / new / hm / top1 accuracy, with chance levels.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from candle_dist import provenance as prov
from candle_dist.classifier import load
from candle_dist.cli import main as cli
from candle_dist.config import load_config
from candle_dist.data.synthetic_images import render, synthetic_classes
from candle_dist.eval.metrics import evaluate
from candle_dist.train.data import TrainingData, eval_data_from_store, training_data_from_store
from candle_dist.train.trainer import fit

KEYS = ("base", "new", "hm", "top1")


def make_stores(out: Path, classes: int, new: int, max_per_class: int, seed: int) -> Path:
    """Shards and tiny-CLIP stores (train, val) under `out`, as the demo makes them."""
    from candle_dist.demo.run import prepare_features

    args = argparse.Namespace(
        cache_dir=None,
        seed=seed,
        clip_steps=None,
        classes=classes,
        new_classes=new,
        max_per_class=max_per_class,
        imbalance_ratio=0.1,
        val_per_class=20,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare_features(args, out)
    return out / "features"


def train_run(train: TrainingData, output: Path, epochs: int, seed: int) -> Path:
    """A Candle run (compensating logit-adjusted loss, the demo's recipe); its final/."""
    cfg = load_config(
        None,
        [
            "loss.name=cla",
            f"optim.epochs={epochs}",
            "optim.lr=0.01",
            "optim.batch_size=128",
            f"train.seed={seed}",
            f"train.output={output}",
            "train.log_every=1000",
            "train.checkpoint_every=100000",
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fit(cfg, train)
    return output / "final"


def base_only(train: TrainingData) -> TrainingData:
    """The training data with the new classes dropped (they have no training images)."""
    base = train.num_base_classes
    names = train.classnames[:base]
    record = prov.provenance(
        names,
        model=train.provenance.get("model"),
        pretrained=train.provenance.get("pretrained"),
        templates=train.provenance.get("templates"),
        dim=int(train.text_features.shape[1]),
    )
    return TrainingData(
        features=train.features,
        labels=train.labels,
        text_features=train.text_features[:base],
        counts=train.counts[:base],
        num_base_classes=base,
        classnames=names,
        logit_scale=train.logit_scale,
        source=train.source,
        clip=train.clip,
        provenance=record,
    )


def write_shots(folder: Path, names: list[str], shots: int, classes: int, seed: int) -> None:
    """`shots` rendered images of each new class (of the demo's `classes`) in folder/NAME/."""
    by_name = {c.name: c for c in synthetic_classes(classes, seed=seed)}
    rng = np.random.default_rng(seed + 1)
    for name in names:
        (folder / name).mkdir(parents=True)
        for k in range(shots):
            render(by_name[name], rng).save(folder / name / f"{k}.jpg", quality=90)


def demonstrate(
    out: Path,
    classes: int,
    new: int,
    max_per_class: int,
    epochs: int,
    shots: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Metrics of: A (new classes declared at training), B (base classes only, scored over
    the base classes), B + names, and B + names + `shots` images per new class (if > 0)."""
    stores = make_stores(out, classes, new, max_per_class, seed)
    train = training_data_from_store(str(stores / "train"))
    val = eval_data_from_store(str(stores / "val"))
    features = torch.as_tensor(np.asarray(val.features[:], np.float32))
    counts, base = train.counts, train.num_base_classes
    new_names = train.classnames[base:]
    (out / "new.txt").write_text("".join(f"{n}\n" for n in new_names))

    def metrics(path: Path) -> dict[str, float]:
        clf = load(path)
        assert clf.classnames == train.classnames, "the grown class list differs from A's"
        got = evaluate(clf.scores(features), val.labels, counts, base)
        return {k: float(got[k]) for k in KEYS}

    results = {"A: declared at training": metrics(train_run(train, out / "a", epochs, seed))}
    final_b = train_run(base_only(train), out / "b", epochs, seed)
    on_base = val.labels < base
    clf_b = load(final_b)
    top1_b = clf_b.scores(features[on_base]).argmax(1).numpy() == val.labels[on_base]
    results["B: base classes only"] = {"base": float(top1_b.mean())}
    grown = out / "b_names"
    argv = ["add-classes", str(final_b), "--names", str(out / "new.txt"), "--output", str(grown)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(argv) == 0
    results["B + names"] = metrics(grown)
    if shots:
        write_shots(out / "shots", new_names, shots, classes, seed)
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli([*argv[:-1], str(out / "b_shots"), "--images", str(out / "shots")]) == 0
        results[f"B + names + {shots} images"] = metrics(out / "b_shots")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--max-per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--shots", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = demonstrate(
            Path(tmp), args.classes, args.new, args.max_per_class, args.epochs, args.shots
        )
    print(
        f"{args.classes} classes ({args.new} new), tiny CLIP, {args.epochs} epochs; chance: "
        f"{1 / args.classes:.4f} over all classes, {1 / args.new:.4f} among the new"
    )
    print(f"{'classifier':<28}" + "".join(f"{k:>8}" for k in KEYS))
    for name, row in results.items():
        cells = "".join(f"{row[k]:>8.4f}" if k in row else f"{'-':>8}" for k in KEYS)
        print(f"{name:<28}{cells}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
