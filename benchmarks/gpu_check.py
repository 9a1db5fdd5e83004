"""The steps of benchmarks/gpu_check.sh: cuda tests, head step times, extraction throughput, report.

    python benchmarks/gpu_check.py {machine,tests,head,extract} --work DIR --logs DIR --limit S
    python benchmarks/gpu_check.py report --work DIR --json PATH [--markdown PATH]

The shell script runs each step in its own process under `timeout` and records its exit status
in DIR/STEP.rc; a step writes DIR/STEP.json (status ok, failed or skipped, and its figures) as
it goes, so a step killed at its limit still reports what it finished. Without a CUDA device
every step is skipped. `--device cpu` is a test mode: the same code at tiny sizes on the CPU,
to know it runs; its figures mean nothing and go to BENCHMARKS.md only with --markdown.
torch is imported only by the steps that use it, so that skipping costs no second.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
STEPS = ("machine", "tests", "head", "extract")
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
TIMED_OUT = (124, 137)  # `timeout`: TERM sent, or KILL after the grace period
# What the steps import: a missing one fails the machine step with its name, before the others.
MODULES = (
    "candle_dist.cli",
    "candle_dist.bench",
    "candle_dist.train.trainer",
    "candle_dist.features.extract",
    "open_clip",
    "webdataset",
    "accelerate",
    "pytest",
)
EXTRACT_MODEL = "ViT-B-16"
BENCH_RUN_LIMIT_S = 60.0  # one `bench head` run: a hung one leaves time for the next


@dataclass(frozen=True)
class Sizes:
    """How big each step runs: the real check on a GPU, or a quick pass of the code on the CPU."""

    tests: tuple[str, ...]  # pytest selection
    head: tuple[tuple[int, int], ...]  # (classes, batch)
    dim: int
    steps: tuple[int, int]  # (warm-up, timed) steps of our head; the dense one runs fewer
    batch: int  # extraction
    batches_per_shard: int  # one shard per loader worker, so that all finish together
    distinct_jpegs: int
    encoder_repeats: int


GPU = Sizes(
    # collecting all of tests/ would need every test's packages
    tests=("tests/test_cuda.py", "tests/test_bf16.py"),
    head=((4000, 128), (8142, 256)),
    dim=512,
    steps=(2, 5),
    batch=256,
    batches_per_shard=2,
    distinct_jpegs=64,
    encoder_repeats=10,
)
CPU = Sizes(
    tests=(
        "tests/test_cuda.py::test_head_fp32_on_device_matches_float64_oracle[none-False]",
        "tests/test_cuda.py::test_head_bf16_error_at_most_twice_the_oracles[none-True]",
    ),
    head=((40, 8), (60, 16)),
    dim=64,
    steps=(0, 1),
    batch=2,
    batches_per_shard=2,
    distinct_jpegs=2,
    encoder_repeats=1,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=[*STEPS, "report"])
    parser.add_argument("--work", type=Path, required=True, help="the steps' records")
    parser.add_argument("--logs", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--limit", type=float, default=600.0, help="this step's time limit, s")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", type=Path, help="report: where the figures go")
    parser.add_argument(
        "--markdown", type=Path,
        help="report: the file whose gpu section is rewritten (default with CUDA: BENCHMARKS.md)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.step == "report":
        return report(args)
    args.logs.mkdir(parents=True, exist_ok=True)
    step = Step(args.step, args.work, time.perf_counter() + args.limit)
    try:
        if args.step == "machine":
            return step.finish(machine(args.device))
        if args.device == "cuda" and not _cuda_available(args.work):
            return step.finish({"status": "skipped", "reason": NO_CUDA})
        sizes = GPU if args.device == "cuda" else CPU
        run = {"tests": run_tests, "head": run_head, "extract": run_extract}[args.step]
        return step.finish(run(step, sizes, args))
    except Exception as err:  # whatever broke, the record says what, and the next step runs
        traceback.print_exc()
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return step.finish({"status": "failed", "reason": reason})


def _cuda_available(work: Path) -> bool:
    """What the machine step found, else what torch says."""
    path = work / "machine.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if "cuda_available" in record:
        return record["cuda_available"]
    import torch

    return torch.cuda.is_available()


class Step:
    """One step's record in WORK/NAME.json, saved whenever it grows."""

    def __init__(self, name: str, work: Path, deadline: float):
        self.name, self.path, self.deadline = name, work / f"{name}.json", deadline
        self.started = time.perf_counter()
        self.record: dict = {"status": "failed", "reason": "interrupted"}
        self.save()

    def left(self) -> float:
        """Seconds until this step's limit, less a margin to write its record."""
        return self.deadline - time.perf_counter() - 10.0

    def save(self, **fields) -> None:
        self.record.update(fields, seconds=round(time.perf_counter() - self.started, 1))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2))
        os.replace(tmp, self.path)

    def finish(self, fields: dict) -> int:
        self.save(**fields)
        status, reason = self.record["status"], self.record.get("reason")
        print(f"{status.upper()} {self.name}" + (f": {reason}" if reason else ""), flush=True)
        return 0 if status in ("ok", "skipped") else 1


def run_logged(command: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run `command`, its output appended to `log`: exit code and stdout, or why it did not end."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        if timeout < 5:
            return {"returncode": None, "stdout": "", "note": "not run: no time left in the step"}
        try:
            done = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=out,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode(errors="replace") if err.stdout else ""
            out.write(stdout)
            note = f"did not finish within {timeout:.0f} s"
            return {"returncode": None, "stdout": stdout, "note": note}
        out.write(done.stdout)
    return {"returncode": done.returncode, "stdout": done.stdout}


# ------------------------------------------------------------------------------------- machine
def machine(device: str) -> dict:
    """The card (name, capability, memory, driver, CUDA, cuDNN) and torch; missing packages."""
    import torch

    info = {
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            driver=_driver_version(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        print(
            f"machine: {info['gpu']} (capability {info['capability']}, {info['memory_gib']} GiB), "
            f"driver {info['driver']}, CUDA {info['cuda']}, torch {info['torch']}",
            flush=True,
        )
    else:
        print(f"machine: {NO_CUDA}; torch {info['torch']}, {info['cpu_cores']} cores", flush=True)
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # an import can fail in any way; name it and go on
            missing.append(f"{name} ({type(err).__name__}: {err})")
    if missing:
        return {"status": "failed", "reason": "cannot import " + "; ".join(missing), **info}
    return {"status": "ok", "reason": None, **info}


def _driver_version() -> str:
    """The NVIDIA driver's version from nvidia-smi (torch does not report it)."""
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return "unknown (nvidia-smi did not answer)"
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else "unknown"


# --------------------------------------------------------------------------------------- tests
def run_tests(step: Step, sizes: Sizes, args: argparse.Namespace) -> dict:
    """pytest -m cuda tests/test_cuda.py: head against the oracle, training resume, extraction."""
    junit = args.work / "junit.xml"
    log = args.logs / "tests.log"
    log.write_text("")
    env = dict(os.environ)
    if args.device == "cpu":
        env["CANDLE_DIST_CUDA_TESTS_ON_CPU"] = "1"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", *sizes.tests, "-q", "--tb=short"]
    command += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
    done = run_logged(command, log, step.left(), env)
    counts = _junit_counts(junit) if junit.exists() else {}
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
    print(f"tests: {summary or 'no results'}; output in {log}", flush=True)
    for failure in counts.get("failures", []):
        print(f"  FAILED {failure['test']}: {failure['message']}", flush=True)
    if done["returncode"] is None:
        return {"status": "failed", "reason": f"pytest {done['note']}", **counts}
    if done["returncode"] != 0 or not counts.get("passed"):
        reason = f"pytest exit code {done['returncode']}: {summary or 'no results'}"
        return {"status": "failed", "reason": reason, **counts}
    return {"status": "ok", "reason": None, **counts}


def _junit_counts(path: Path) -> dict:
    """Passed/failed/errors/skipped counts and each failure's test and first message line."""
    tree = ET.parse(path).getroot()
    suite = tree if tree.tag == "testsuite" else tree.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for problem in [*case.findall("failure"), *case.findall("error")]:
            message = (problem.get("message") or "").strip().splitlines() or [""]
            failures.append({"test": case.get("name"), "message": message[0][:300]})
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failures": failures,
    }


# ---------------------------------------------------------------------------------------- head
def run_head(step: Step, sizes: Sizes, args: argparse.Namespace) -> dict:
    """`candle-dist bench head --dtype bf16`, ours then the dense reference, at each size."""
    log = args.logs / "head.log"
    log.write_text("")
    runs = []
    for classes, batch in sizes.head:
        for dense in (False, True):
            warmup, timed = (1, 3) if dense and args.device == "cuda" else sizes.steps
            command = [sys.executable, "-m", "candle_dist.cli", "bench", "head"]
            command += ["--classes", str(classes), "--batch", str(batch), "--dim", str(sizes.dim)]
            command += ["--dtype", "bf16", "--warmup", str(warmup), "--steps", str(timed)]
            command += ["--json", *(["--dense"] if dense else [])]
            result = _bench(command, log, min(BENCH_RUN_LIMIT_S, step.left()))
            result.update(impl="dense" if dense else "candle", classes=classes, batch=batch)
            runs.append(result)
            step.save(runs=runs)
            print(f"head: {_describe(result)}", flush=True)
    failed = [r for r in runs if r["impl"] == "candle" and "step_s_median" not in r]
    if failed:
        reason = "; ".join(f"C = {r['classes']}: {r['error']}" for r in failed)
        return {"status": "failed", "reason": f"our head did not run: {reason}"}
    return {"status": "ok", "reason": None}


def _bench(command: list[str], log: Path, timeout: float) -> dict:
    """The bench's JSON line, or {"error": why not} (out of memory, too slow, a crash)."""
    start = log.stat().st_size
    done = run_logged(command, log, timeout)
    lines = [line for line in done["stdout"].splitlines() if line.startswith("{")]
    if done["returncode"] == 0 and lines:
        return json.loads(lines[-1])
    if done["returncode"] is None:
        return {"error": done["note"]}
    output = log.read_text(errors="replace")[start:]
    if "out of memory" in output.lower():
        return {"error": "CUDA out of memory"}
    last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
    return {"error": f"exit code {done['returncode']}: {last[0][:200]}"}


def _describe(run: dict) -> str:
    name = f"{run['impl']} C = {run['classes']:,}, B = {run['batch']}"
    if "step_s_median" not in run:
        return f"{name}: {run['error']}"
    return (
        f"{name}: {run['step_s_median']:.4f} s/step, peak {run['peak_mem_mb'] / 1024:.2f} GB, "
        f"{run['gflops'] / 1000:.1f} TFLOP/s"
    )


# ------------------------------------------------------------------------------------- extract
def run_extract(step: Step, sizes: Sizes, args: argparse.Namespace) -> dict:
    """ViT-B-16 (random init) images/s: the encoder alone on random tensors, then end to end."""
    import numpy as np
    import torch
    from bench_decode import photo_like_jpeg  # benchmarks/, this script's folder

    from candle_dist.data.shards import write_classnames, write_shard
    from candle_dist.features.extract import DistEnv, default_workers, extract

    figures = {"model": EXTRACT_MODEL, "batch": sizes.batch, "device": args.device}
    figures["encoder_images_per_s"] = round(encoder_alone(args.device, sizes), 1)
    step.save(**figures)
    print(f"extract: encoder alone {figures['encoder_images_per_s']} images/s", flush=True)

    rng = np.random.default_rng(0)
    jpegs = [photo_like_jpeg(rng, (800, 600)) for _ in range(sizes.distinct_jpegs)]
    workers = default_workers(torch.device(args.device), DistEnv())
    shards, per_shard = max(1, workers), sizes.batches_per_shard * sizes.batch
    with tempfile.TemporaryDirectory(prefix="gpu-check-extract-") as tmp:
        folder = Path(tmp) / "shards"
        for s in range(shards):
            samples = [
                {"__key__": f"train_{i:07d}", "jpg": jpegs[i % len(jpegs)], "cls": str(i % 10)}
                for i in range(s * per_shard, (s + 1) * per_shard)
            ]
            write_shard(folder / f"train-{s:06d}.tar", samples)
        write_classnames(folder / "classnames.txt", [f"species {i}" for i in range(10)])
        spec = f"{folder}/train-{{000000..{shards - 1:06d}}}.tar"
        started = time.perf_counter()
        stats = extract(
            spec,
            Path(tmp) / "store",
            EXTRACT_MODEL,
            "none",
            batch_size=sizes.batch,
            workers=workers,
            device=args.device,
            progress=False,
        )
        whole = time.perf_counter() - started
    seconds = stats["seconds"]
    figures.update(
        images=stats["samples_done"],
        shards=shards,
        distinct_jpegs=sizes.distinct_jpegs,
        workers=workers,
        images_per_s=round(stats["samples_done"] / seconds, 1),
        encoder_share=round(stats["encoder_seconds"] / seconds, 3),
        loader_wait_share=round(stats["loader_wait_seconds"] / seconds, 3),
        whole_call_s=round(whole, 1),
    )
    print(
        f"extract: end to end {figures['images_per_s']} images/s over {figures['images']} images "
        f"(loader workers: {workers})",
        flush=True,
    )
    return {"status": "ok", "reason": None, **figures}


def encoder_alone(device_name: str, sizes: Sizes) -> float:
    """Images/s of the image tower on random input, with extraction's autocast and layout."""
    import torch

    from candle_dist.features.clip_loading import load_clip
    from candle_dist.features.transforms import PreprocessSpec

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    model, _, _ = load_clip(EXTRACT_MODEL, "none", device=device)
    model = model.to(memory_format=torch.channels_last)
    height, width = PreprocessSpec.from_model(model).size
    x = torch.randn(sizes.batch, 3, height, width, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    rates = []
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
        for index in range(2 + sizes.encoder_repeats):  # two warm-up batches
            started = time.perf_counter()
            model.encode_image(x)
            if cuda:
                torch.cuda.synchronize(device)
            if index >= 2:
                rates.append(sizes.batch / (time.perf_counter() - started))
    return statistics.median(rates)


# -------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace) -> int:
    """Merge the steps' records and exit codes into the JSON; the markdown section if figures."""
    steps = {name: _final_record(args.work, name) for name in STEPS}
    machine_info = steps.pop("machine")
    failed = [
        name for name, r in {"machine": machine_info, **steps}.items() if r["status"] == "failed"
    ]
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "bash benchmarks/gpu_check.sh",
        "json": _shown(args.json),
        "device": args.device,
        "machine": machine_info,
        "steps": steps,
        "failed": failed,
        "ok": not failed,
    }
    markdown = args.markdown
    if markdown is None and args.device == "cuda":
        markdown = BENCHMARKS_MD
    ran = any(r["status"] == "ok" for r in steps.values())
    result["markdown"] = str(markdown) if markdown is not None and ran else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(f"gpu check on {args.device}:")
    for name, record in {"machine": machine_info, **steps}.items():
        reason = f"  {record['reason']}" if record.get("reason") else ""
        print(
            f"  {name:<8} {record['status'].upper():<8} {record.get('seconds', 0):>6.1f} s{reason}"
        )
    print(f"figures: {args.json}")
    if result["markdown"] is not None:
        write_section(markdown, section_body(result))
        print(f"section <!-- bench:gpu --> written to {markdown}")
    else:
        print("no markdown written (no figures)")
    return 1 if failed else 0


def _final_record(work: Path, name: str) -> dict:
    """A step's record, marked failed where its process did not exit cleanly."""
    path, rc_path = work / f"{name}.json", work / f"{name}.rc"
    record = json.loads(path.read_text()) if path.exists() else {}
    if not rc_path.exists():
        return {**record, "status": "failed", "reason": "not run"}
    rc, limit = (int(word) for word in rc_path.read_text().split())
    if rc in TIMED_OUT:
        record.update(status="failed", reason=f"killed at its limit of {limit} s")
    elif rc != 0 and record.get("status") != "failed":
        record.update(status="failed", reason=f"exit code {rc}")
    record.setdefault("status", "failed")
    record.setdefault("reason", f"exit code {rc} before it wrote a record")
    return record


def _shown(path: Path) -> str:
    """`path` relative to the repository when inside it, else its name alone."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the gpu section of `path`, as benchmarks/report.py does for others."""
    title = f"GPU check: cuda tests, Candle head and {EXTRACT_MODEL} extraction in bf16"
    section = f"<!-- bench:gpu -->\n## {title}\n\n{body.strip()}\n<!-- /bench:gpu -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"<!-- bench:gpu -->.*?<!-- /bench:gpu -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def section_body(result: dict) -> str:
    """Provenance (the card named in full), then one paragraph or table per step."""
    from report import machine_description  # benchmarks/, this script's folder

    m, steps = result["machine"], result["steps"]
    card = "no CUDA device (CPU test mode: these figures check the script, nothing else)"
    if m.get("gpu"):
        card = (
            f"{m['gpu']}, compute capability {m['capability']}, {m['memory_gib']} GiB, "
            f"{m['multiprocessors']} SMs; driver {m['driver']}, CUDA {m['cuda']} (torch build), "
            f"cuDNN {m['cudnn']}, torch {m['torch']}"
        )
    lines = [
        f"Machine: {machine_description()}  ",
        f"Card: {card}  ",
        f"Command: `{result['command']}` (every figure: {result['json']})  ",
        f"Date: {result['date']}",
        "",
        "Steps: "
        + ", ".join(
            f"{name} {r['status']} ({r.get('seconds', 0):.0f} s)" for name, r in steps.items()
        )
        + ".",
        "",
    ]
    lines += _tests_lines(steps["tests"]) + _head_lines(steps["head"])
    lines += _extract_lines(steps["extract"])
    return "\n".join(lines)


def _tests_lines(record: dict) -> list[str]:
    if "passed" not in record:
        return [f"**CUDA tests** (`pytest -m cuda tests/test_cuda.py`): {record['reason']}.", ""]
    lines = [
        f"**CUDA tests** (`pytest -m cuda tests/test_cuda.py`: the head against the dense oracle "
        f"in fp32 and bf16, training with a resume, extraction): {record['passed']} passed, "
        f"{record['failed']} failed, {record['errors']} errors, {record['skipped']} skipped."
    ]
    lines += [f"- failed: `{f['test']}`: {f['message']}" for f in record.get("failures", [])]
    return [*lines, ""]


def _head_lines(record: dict) -> list[str]:
    runs = record.get("runs", [])
    if not runs:
        return [f"**Head step**: {record['reason']}.", ""]
    header = (
        "| impl | C | B | median s/step | peak GPU GB | GFLOP/step | TFLOP/s | time ours/dense "
    )
    header += "| memory ours/dense |"
    lines = [
        "**Head step** (`candle-dist bench head --dtype bf16`: forward, three CLA losses, "
        "backward, SGD; bf16 autocast, parameters fp32; attention dropout 0.1; median of the "
        "timed steps after the warm-up ones):",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["impl"], r["classes"]): r for r in runs}
    for run in runs:
        cells = [run["impl"], f"{run['classes']:,}", str(run["batch"])]
        if "step_s_median" not in run:
            lines.append("| " + " | ".join([*cells, run["error"], "", "", "", "", ""]) + " |")
            continue
        dense = by_key.get(("dense", run["classes"]), {})
        time_ratio = memory_ratio = "-"
        if run["impl"] == "candle" and "step_s_median" in dense:
            time_ratio = f"{run['step_s_median'] / dense['step_s_median']:.2f}"
            memory_ratio = f"{run['peak_mem_mb'] / dense['peak_mem_mb']:.2f}"
        cells += [
            f"{run['step_s_median']:.4f}",
            f"{run['peak_mem_mb'] / 1024:.2f}",
            f"{run['step_gflop']:.0f}",
            f"{run['gflops'] / 1000:.1f}",
            time_ratio,
            memory_ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if record["status"] != "ok":
        lines += ["", f"Step {record['status']}: {record['reason']}."]
    return [*lines, ""]


def _extract_lines(record: dict) -> list[str]:
    if "images_per_s" not in record:
        alone = record.get("encoder_images_per_s")
        partial = f" (encoder alone: {alone} images/s)" if alone else ""
        return [f"**Extraction**: {record['reason']}{partial}.", ""]
    return [
        f"**Extraction**, {record['model']} (random init), bf16 autocast, batch {record['batch']}: "
        f"{record['images']} JPEGs of 800x600 px ({record['distinct_jpegs']} distinct, repeated) "
        f"in {record['shards']} shards, one per loader worker (the default count).",
        "",
        "| | images/s |",
        "|---|---|",
        f"| end to end (`candle_dist.features.extract`: decode, encode, write) "
        f"| {record['images_per_s']:.0f} |",
        f"| encoder alone, random tensors, same batch | {record['encoder_images_per_s']:.0f} |",
        "",
        f"End to end: {100 * record['encoder_share']:.0f}% of the encode loop in the encoder, "
        f"{100 * record['loader_wait_share']:.0f}% waiting for the loader; the whole call "
        f"(model load and class-name text features included) took {record['whole_call_s']} s.",
    ]


if __name__ == "__main__":
    sys.exit(main())
