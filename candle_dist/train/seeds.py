"""Several seeds of one configuration, and their metrics as mean ± std.

Long-tail results on few-shot and new classes move by points between seeds; a comparison that
reports one seed can be luck. `train.seeds: [0, 1, 2]` (or `candle-dist train --seeds 3`) trains
the configuration once per seed into `OUTPUT/seed-<s>/` (each resumable on its own) and writes
`OUTPUT/seeds.json`: every seed's evaluation and, per scalar metric, the mean and the sample
standard deviation over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from candle_dist.config import Config


def seed_config(cfg: Config, seed: int) -> Config:
    """`cfg` with train.seed = `seed` and its output in OUTPUT/seed-<seed>."""
    train = dataclasses.replace(
        cfg.train, seed=seed, seeds=[], output=str(Path(cfg.train.output) / f"seed-{seed}")
    )
    return dataclasses.replace(cfg, train=train)


def summarize(evaluations: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per scalar metric present in every seed's evaluation: mean, std (0 for one seed), n."""
    names = [
        name
        for name, value in next(iter(evaluations.values())).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    summary = {}
    for name in names:
        values = [e[name] for e in evaluations.values() if e.get(name) is not None]
        if len(values) == len(evaluations):
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return summary


def write_summary(output: str | Path, evaluations: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """OUTPUT/seeds.json (written atomically); returns its content."""
    content = {
        "seeds": sorted(evaluations),
        "summary": summarize(evaluations),
        "per_seed": {str(seed): evaluations[seed] for seed in sorted(evaluations)},
    }
    path = Path(output) / "seeds.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)
    return content


def table(content: dict[str, Any], keys: tuple[str, ...]) -> str:
    """One line `name mean±std` per metric of `keys` that the summary has."""
    summary = content["summary"]
    cells = [f"{k} {summary[k]['mean']:.4f}±{summary[k]['std']:.4f}" for k in keys if k in summary]
    return f"{len(content['seeds'])} seeds: " + "  ".join(cells)
