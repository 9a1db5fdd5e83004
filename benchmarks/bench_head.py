"""Head training-step benchmark: the memory-efficient Candle head against the dense reference style.

Run: python benchmarks/bench_head.py            (about 40 minutes on this 2-core CPU)
     python benchmarks/bench_head.py --resume   (after a kill: reuses the configs already done)

Every configuration runs `candle-dist bench head ... --json` in a fresh process (so peak RSS is
that configuration's), P = 2 under torchrun. The table goes to BENCHMARKS.md (section "head"),
the plot of step time against C to benchmarks/head_step_time.png, and each configuration's raw
JSON to runs/bench_head/ (written atomically, so a killed run resumes without redoing or losing
a configuration).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import psutil
import torch
from report import write_section
from tqdm import tqdm

from candle_dist.bench import step_flops

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "benchmarks" / "head_step_time.png"
DIM = 512


@dataclass(frozen=True)
class Run:
    """One `candle-dist bench head` invocation."""

    name: str
    classes: int
    batch: int = 128
    mask: str = "none"
    dense: bool = False
    processes: int = 1
    steps: int = 3
    warmup: int = 1
    attn_dropout: float = 0.1
    sampled: float | None = None
    native: bool = True  # False: softmax + dropout in torch ops (as without a C compiler)

    def command(self) -> list[str]:
        launcher = [sys.executable]
        if self.processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone"]
            launcher += ["--nproc_per_node", str(self.processes)]
        args = ["-m", "candle_dist.cli", "bench", "head", "--classes", str(self.classes)]
        args += ["--batch", str(self.batch), "--dim", str(DIM), "--mask", self.mask]
        args += ["--steps", str(self.steps), "--warmup", str(self.warmup)]
        args += ["--attn-dropout", str(self.attn_dropout), "--json"]
        if self.sampled is not None:
            args += ["--sampled", str(self.sampled)]
        return launcher + args + (["--dense"] if self.dense else [])

    @property
    def flops(self) -> float:
        return step_flops(self.classes, self.batch, DIM, self.mask)


COMPARISON = [
    Run("ours-1k", 1000, steps=5),
    Run("dense-1k", 1000, dense=True),
    Run("ours-4k", 4000),
    Run("dense-4k", 4000, dense=True),
    Run("ours-4k-in_visual", 4000, mask="in_visual", steps=2),
    # Without dropout the CPU runs torch's fused flash kernel: what dropout costs us here.
    Run("ours-4k-no-dropout", 4000, attn_dropout=0.0),
    # Without the compiled kernel (no C compiler, or CANDLE_DIST_NATIVE=0).
    Run("ours-4k-torch-softmax", 4000, native=False),
]
SCALE = [
    Run("ours-8142", 8142, batch=256, steps=2, warmup=0),
    Run("ours-20k", 20000, batch=256, steps=1, warmup=0),
    Run("ours-50k", 50000, batch=256, steps=1, warmup=0),
]
# A larger run is predicted from a smaller one (time by FLOP, memory over baseline by L^2) and
# skipped if it would not fit in the available memory or, for 50k, take over --max-step-s.
PREDICTED_FROM = {"ours-20k": "ours-8142", "ours-50k": "ours-20k"}
TIME_CAPPED = {"ours-50k"}
# Sampled mode: about 2,000 drawn classes (plus the batch's) per step, at 10^5 and 10^6 classes.
SAMPLED = [
    Run("sampled-100k", 100_000, batch=256, sampled=0.02),
    Run("sampled-1M", 1_000_000, batch=256, sampled=0.002),
]
PARALLEL = [Run("ours-4k-P2", 4000, processes=2, steps=2)]
# Same inputs and initial weights: the first step's loss must agree to fp32 rounding; without
# dropout across implementations, with dropout across rank counts (the dense head draws its
# dropout from torch's generator, ours from token ids, so only ours agree there).
AGREEMENT = [
    Run("agree-ours-P1", 1000, steps=1, warmup=0, attn_dropout=0.0),
    Run("agree-ours-P2", 1000, processes=2, steps=1, warmup=0, attn_dropout=0.0),
    Run("agree-dense", 1000, dense=True, steps=1, warmup=0, attn_dropout=0.0),
    Run("agree-dropout-ours-P1", 1000, steps=1, warmup=0),
    Run("agree-dropout-ours-P2", 1000, processes=2, steps=1, warmup=0),
]
PAIRS = {
    "ours-1k": "dense-1k",
    "ours-4k": "dense-4k",
    "ours-4k-in_visual": "dense-4k",
    "ours-4k-torch-softmax": "dense-4k",
}
MEMORY_LIMIT_8142_GB = 6.0


def matmul_gflops(size: int = 2048, repeats: int = 8) -> float:
    """Best fp32 torch.mm rate of this machine right now (GFLOP/s), with torch's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def _probe(path: Path, resume: bool) -> float:
    """`matmul_gflops`, kept in `path` so that a resumed run reports the rate it measured."""
    if resume and path.exists():
        return json.loads(path.read_text())["gflops"]
    rate = matmul_gflops()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"gflops": rate}))
    os.replace(tmp, path)
    return rate


def run_config(run: Run, work_dir: Path, resume: bool, threads: int) -> dict:
    """The JSON result of one configuration (reused from `work_dir` with --resume)."""
    path = work_dir / f"{run.name}.json"
    if resume and path.exists():
        return json.loads(path.read_text())
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // run.processes)))
    env["CANDLE_DIST_NATIVE"] = "1" if run.native else "0"
    for _ in range(2):  # a second try only for a start-up failure (e.g. a rendezvous port race)
        started = time.perf_counter()
        done = subprocess.run(
            run.command(), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False
        )
        if done.returncode == 0 or time.perf_counter() - started > 60:
            break
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
    else:
        killed = " (SIGKILL: out of memory, most likely)" if done.returncode == -9 else ""
        result = {"error": f"exit code {done.returncode}{killed}"}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="reuse finished configurations")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench_head")
    parser.add_argument(
        "--max-step-s", type=float, default=900.0,
        help="skip the 50k run if the 20k run predicts a longer step",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="torch threads per benchmarked process (default: every core; P = 2 splits them)",
    )  # fmt: skip
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # the matmul probe, like the benchmarked processes

    rate_before = _probe(args.work_dir / "probe_before.json", args.resume)
    tqdm.write(f"fp32 torch.mm: {rate_before:.1f} GFLOP/s")
    results: dict[str, dict] = {}
    notes: dict[str, str] = {}
    runs = COMPARISON + AGREEMENT + PARALLEL + SCALE[:1] + SAMPLED + SCALE[1:]
    by_name = {run.name: run for run in runs}
    for run in tqdm(runs, desc="configs"):
        if run.name in PREDICTED_FROM:
            reference = PREDICTED_FROM[run.name]
            max_s = args.max_step_s if run.name in TIME_CAPPED else math.inf
            note = _skip_note(run, by_name[reference], results.get(reference, {}), max_s)
            if note is not None:
                notes[run.name] = note
                tqdm.write(f"{run.name}: {note}")
                continue
        tqdm.write(f"{run.name}: {' '.join(run.command()[1:])}")
        results[run.name] = run_config(run, args.work_dir, args.resume, args.threads)
        tqdm.write(f"{run.name}: {json.dumps(results[run.name])}")
    rate_after = _probe(args.work_dir / "probe_after.json", args.resume)
    rate = max(rate_before, rate_after)

    body = _report(runs, results, notes, rate_before, rate_after, rate, args.threads)
    _plot(runs, results, rate)
    write_section(
        "head", "Candle head: one training step, ours vs dense (CPU, fp32, D = 512)", body
    )
    print(body)
    return 0


def _skip_note(run: Run, reference: Run, result: dict, max_s: float) -> str | None:
    """Why `run` is not worth running, predicted from `reference`'s result; None to run it."""
    if "step_s_median" not in result:
        return f"not run: {reference.name} failed, so no estimate"
    seconds = result["step_s_median"] * run.flops / reference.flops
    tokens = (run.batch + 2 * run.classes) / (reference.batch + 2 * reference.classes)
    growth_gb = result["peak_mem_mb"] / 1024 * tokens**2
    predicted_gb = (result["peak_rss_mb"] - result["peak_mem_mb"]) / 1024 + growth_gb
    available_gb = psutil.virtual_memory().available / 2**30
    if predicted_gb > 0.9 * available_gb:
        return (
            f"not run: {reference.name}'s peak RSS scaled by L^2 predicts {predicted_gb:.0f} GB, "
            f"{available_gb:.0f} GB available"
        )
    if seconds > max_s:
        return f"not run: {reference.name} predicts {seconds:.0f} s per step (> {max_s:.0f} s)"
    return None


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f}"


COLUMNS = [
    "run", "impl", "C", "B", "mask", "attn dropout", "P", "timed steps", "median s/step",
    "peak RSS GB (over baseline)", "time ours/dense", "peak RSS ours/dense", "GFLOP/step",
    "floor s", "floor / step",
]  # fmt: skip


def _row(run: Run, res: dict, results: dict, rate: float) -> list[str]:
    classes = f"{run.classes:,}" + (f" (sampled {run.sampled})" if run.sampled else "")
    impl = "dense" if run.dense else "candle" if run.native else "candle, torch softmax"
    cells = [run.name, impl, classes, str(run.batch)]
    cells += [run.mask, str(run.attn_dropout), str(run.processes)]
    if "step_s_median" not in res:
        return [*cells, "-", res.get("note") or f"failed: {res.get('error')}"]
    median = res["step_s_median"]
    floor = res["step_gflop"] / rate
    time_ratio = mem_ratio = "-"
    if run.name in PAIRS and "step_s_median" in results.get(PAIRS[run.name], {}):
        dense = results[PAIRS[run.name]]
        time_ratio = f"{median / dense['step_s_median']:.2f}"
        mem_ratio = f"{res['peak_rss_mb'] / dense['peak_rss_mb']:.2f}"
    return [
        *cells,
        str(len(res["step_s_all"])),
        f"{median:.2f}",
        f"{_gb(res['peak_rss_mb'])} ({_gb(res['peak_mem_mb'])})",
        time_ratio,
        mem_ratio,
        f"{res['step_gflop']:.0f}",
        f"{floor:.2f}",
        f"{floor / median:.0%}",
    ]


def _report(runs, results, notes, rate_before, rate_after, rate, threads: int) -> str:
    rows = [
        _row(run, results.get(run.name, {"note": notes.get(run.name)}), results, rate)
        for run in runs
        if run not in AGREEMENT
    ]
    table = [COLUMNS, ["---"] * len(COLUMNS)]
    table += [row + [""] * (len(COLUMNS) - len(row)) for row in rows]
    header = "\n".join("| " + " | ".join(row) + " |" for row in table)
    lines = [header, ""]
    lines += _scale_notes(results, rate)
    lines += _agreement_notes(results)
    lines += [
        "",
        f"Head code: {_code_version()}. Threads: {threads} per process (OMP_NUM_THREADS; the "
        f"P = 2 run: {max(1, threads // 2)} per process). Run on an otherwise idle machine: with "
        "every core in use by the benchmark, other work makes OpenMP threads wait on each other "
        "and a step several-fold slower.",
        "",
        f"fp32 `torch.mm` 2048x2048 probe ({threads} thread(s)) in the same run: "
        f"{rate_before:.1f} GFLOP/s before, "
        f"{rate_after:.1f} after; the floor uses the better, {rate:.1f} GFLOP/s. Floor = counted "
        "matmul arithmetic of one step (`candle_dist.bench.step_flops`: the three projections, "
        "the attention's in/out projections, QK^T and AV over the pairs the mask allows, the three "
        "R x C logit matmuls; backward = 2x forward; our recomputation not counted) / that rate.",
        "",
        "A step = forward, three CLA losses, backward, SGD (momentum, weight decay), attention "
        "dropout 0.1, synthetic inputs (`candle-dist bench head`). Peak RSS is the process's "
        "(ru_maxrss), including torch itself (~0.5 GB); the ratio column uses it as is. Dense = "
        "benchmarks/dense_head.py: torch.nn.MultiheadAttention over all B + 2C tokens with an "
        "L x L boolean mask and full R x C logits. Step times are medians of the timed steps "
        "after the warm-up ones. "
        "The P = 2 row runs 2 processes under torchrun (gloo) on the same 2 cores: a "
        "correctness run of the class-parallel path (see the agreement line), not a scaling "
        "measurement. The in_visual "
        "row is compared with the dense mask-none run: the dense cost does not depend on the mask.",
        "",
        f"![step time against C]({PLOT.name})",
    ]
    return "\n".join(lines)


def _code_version() -> str:
    """The commit, and whether the head's code differs from it in the working tree."""
    head = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*head, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(
        [*head, "status", "--porcelain", "candle_dist/model", "candle_dist/parallel"],
        capture_output=True,
        text=True,
    )
    if commit.returncode:
        return "not a git checkout"
    dirty = " with uncommitted changes in the head" if changed.stdout.strip() else ""
    return f"commit {commit.stdout.strip()}{dirty}"


def _scale_notes(results, rate) -> list[str]:
    notes = []
    res = results.get("ours-8142", {})
    if "peak_rss_mb" in res:
        verdict = "within" if res["peak_rss_mb"] / 1024 <= MEMORY_LIMIT_8142_GB else "OVER"
        notes.append(
            f"- C = 8,142, B = 256: peak RSS {_gb(res['peak_rss_mb'])} GB, {verdict} the "
            f"{MEMORY_LIMIT_8142_GB:.0f} GB limit."
        )
    fit = _fit_rate(results)
    if fit is not None:
        for classes in (50_000, 100_000):
            flops = step_flops(classes, 256, DIM)
            notes.append(
                f"- Exact mode, C = {classes:,}, B = 256, by the fitted model "
                f"(t = FLOP / {fit:.1f} GFLOP/s): about {flops / fit / 1e9 / 60:.0f} min per step "
                f"(floor {flops / rate / 1e9 / 60:.0f} min)."
            )
    for run in SAMPLED:
        res = results.get(run.name, {})
        if "step_s_median" in res:
            notes.append(
                f"- Sampled mode, C = {run.classes:,}, fraction {run.sampled}: "
                f"{res['step_classes']:,} classes in the first step, "
                f"{res['step_s_median']:.1f} s per step, peak RSS {_gb(res['peak_rss_mb'])} GB "
                f"(the head's text features and prototypes alone: "
                f"{2 * run.classes * DIM * 4 / 2**30:.2f} GB)."
            )
    return notes


def _agreement_notes(results) -> list[str]:
    notes = []
    for dropout, prefix in ((0.0, "agree-"), (0.1, "agree-dropout-")):
        runs = [run for run in AGREEMENT if run.attn_dropout == dropout]
        losses = {run.name: results.get(run.name, {}).get("first_loss") for run in runs}
        if any(value is None for value in losses.values()):
            notes.append(f"- Agreement check (dropout {dropout}): a run failed, see the JSON.")
            continue
        ref = losses[runs[0].name]
        spread = max(abs(value - ref) / abs(ref) for value in losses.values())
        listed = ", ".join(f"{name[len(prefix) :]} {value:.7f}" for name, value in losses.items())
        notes.append(
            f"- Agreement (C = 1,000, B = 128, attention dropout {dropout}, same inputs and "
            f"initial weights): first-step loss {listed}; largest relative difference "
            f"{spread:.1e}."
        )
    return notes


def _fit_rate(results) -> float | None:
    """Effective GFLOP/s of our one-process exact step: geometric mean of FLOP / time."""
    rates = [
        run.flops / results[run.name]["step_s_median"] / 1e9
        for run in COMPARISON + SCALE
        if not run.dense
        and run.native
        and run.mask == "none"
        and run.attn_dropout > 0
        and "step_s_median" in results.get(run.name, {})
    ]
    return math.exp(statistics.fmean(math.log(r) for r in rates)) if rates else None


def _plot(runs, results, rate) -> None:
    fit = _fit_rate(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, marker, keep in (
        ("ours, B = 128", "o", lambda r: not r.dense and r.batch == 128 and not r.sampled),
        ("ours, B = 256", "s", lambda r: not r.dense and r.batch == 256 and not r.sampled),
        ("dense reference, B = 128", "x", lambda r: r.dense),
        ("ours sampled, ~2,000 classes/step, B = 256", "^", lambda r: bool(r.sampled)),
    ):
        points = [
            (run.classes, results[run.name]["step_s_median"])
            for run in runs
            if keep(run)
            and run.native
            and run.processes == 1
            and run.mask == "none"
            and run.attn_dropout > 0
            and "step_s_median" in results.get(run.name, {})
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker, label=label, markersize=8)
    grid = [int(10 ** (2.8 + 0.05 * i)) for i in range(65)]
    model = [step_flops(c, 256, DIM) / 1e9 for c in grid]
    if fit is not None:
        ax.plot(grid, [m / fit for m in model], "-", label=f"fit: FLOP / {fit:.1f} GFLOP/s")
    ax.plot(grid, [m / rate for m in model], ":", label=f"floor: FLOP / {rate:.0f} GFLOP/s")
    ax.set(xscale="log", yscale="log", xlabel="classes C", ylabel="seconds per training step")
    ax.set_title("Candle head step (fp32, D = 512, CPU); exact-mode model O(C² D), B = 256")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
