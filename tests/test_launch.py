"""Launchers: the SLURM scripts (dry-run and a real run on a faked SLURM), submitit, requeue.

The end-to-end runs share one tiny problem (synthetic image shards, a random tiny CLIP):
- `candle-dist submit --local`: a 2-task extraction array per split, then 2 trainer ranks,
  interrupted by submitit's signal (checkpoint, requeue by submitit), continued to the end;
- slurm/train_inat.sh under a fake `srun`/`scontrol` that start the tasks on this machine, on
  those stores (its extraction stage finds them complete): training as 2 "nodes" (2 `accelerate
  launch`, machine ranks 0 and 1) stopped by SIGUSR1 to the batch script (checkpoint, `scontrol
  requeue`), then the requeued job, which resumes;
and both must end where an uninterrupted single-process training on the same features ends.
(Processes cost most of the time here, so extraction runs for real once; the dry-run tests
check the srun extraction command against the one submitit runs.)
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from candle_dist.cli import main as cli_main
from candle_dist.config import load_config
from candle_dist.submit import TrainTask, extract_argv

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]  # PYTHON's own

FAKE_SRUN = """#!{python}
# srun for tests: --ntasks copies of the command on this machine with the SLURM task
# variables set; SIGUSR1/SIGTERM are forwarded to them.
import os, signal, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(sys.argv[1:]) + "\\n")
ntasks = int(opts.get("ntasks", "1"))
per_node = int(opts.get("ntasks-per-node", ntasks))
def task_env(r):
    return dict(os.environ, SLURM_PROCID=str(r), SLURM_NTASKS=str(ntasks),
                SLURM_LOCALID=str(r % per_node), SLURM_NODEID=str(r // per_node))
procs = [subprocess.Popen(args, env=task_env(r)) for r in range(ntasks)]
def forward(signum, frame):
    for p in procs:
        try:
            p.send_signal(signum)
        except ProcessLookupError:
            pass
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, forward)
codes = [p.wait() for p in procs]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c), 0))
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then tr , '\\n' <<< "$3"; fi
"""

FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(cat "$FAKE_SLURM_DIR/next" 2> /dev/null || echo 1000) + 1 ))
echo "$n" > "$FAKE_SLURM_DIR/next"
cp "${@: -1}" "$FAKE_SLURM_DIR/sbatch-$n.sh"
echo "Submitted batch job $n"
"""


def _slurm_env(**variables) -> dict:
    """This environment without SLURM/torchrun variables, plus `variables`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PET_")) and k not in ("RANK", "WORLD_SIZE")
    }
    env.update(PYTHON=sys.executable, REPO=str(ROOT))
    env.update({k: str(v) for k, v in variables.items()})
    return env


def _dry_run(script="train_inat.sh", *args, **variables):
    return subprocess.run(
        ["bash", str(ROOT / "slurm" / script), "--dry-run", *args],
        env=_slurm_env(**variables),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ srun")]


def _option(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "#SBATCH --signal=B:USR1@120" in script.read_text()
    assert "#SBATCH --requeue" in script.read_text()


def test_dry_run_on_four_nodes_shows_world_ranks_and_main_address():
    result = _dry_run(
        "train_inat.sh",
        "optim.lr=5e-4",
        SLURM_JOB_NODELIST="gpu-[01-03,07]",
        SLURM_NNODES=4,
        SLURM_NODEID=2,
        SLURM_GPUS_ON_NODE=8,
        SLURM_CPUS_ON_NODE=64,
        SLURM_JOB_ID=777,
        OVERRIDES="clip.batch_size=128",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4 node(s) x 8 GPU(s) = 32 rank(s)" in out
    assert "this is node 2 (gpu-03) of: gpu-01 gpu-02 gpu-03 gpu-07" in out
    extract_train, extract_val, train = _commands(out)
    for step in (extract_train, extract_val):
        assert _option(step, "--ntasks") == "32"
        assert _option(step, "--ntasks-per-node") == "8"
        assert _option(step, "--cpus-per-task") == "8"
        assert _option(step, "--batch-size") == "128"  # the override reaches extraction
    assert _option(extract_train, "--split") == "train"
    assert _option(extract_val, "--split") == "eval"
    assert _option(train, "--ntasks") == "4"
    assert _option(train, "--ntasks-per-node") == "1"
    assert "$SLURM_NODEID" in train[train.index("-c") + 1]  # each node's rank, on that node
    assert _option(train, "--num_machines") == "4"
    assert _option(train, "--num_processes") == "32"
    assert _option(train, "--main_process_ip") == "gpu-01"
    assert train[-4:] == [
        "configs/inat2018.yaml",
        "--resume",
        "clip.batch_size=128",
        "optim.lr=5e-4",
    ]
    node = next(line for line in out.splitlines() if line.startswith("# node 2 runs:"))
    node_argv = shlex.split(node.split(":", 1)[1])
    assert node_argv[:5] == [*ACCELERATE_LAUNCH, "--machine_rank", "2"]
    assert _option(node_argv, "--num_processes") == "32"


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node7", ["node7"]),
        ("a[1-2]-b[08-09]", ["a1-b08", "a1-b09", "a2-b08", "a2-b09"]),
        ("x[9-11],login", ["x9", "x10", "x11", "login"]),
        ("rack1-[003,010-011]", ["rack1-003", "rack1-010", "rack1-011"]),
    ],
)
def test_nodelist_expansion_without_scontrol(nodelist, hosts):
    result = _dry_run(SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=len(hosts), SLURM_NODEID=0)
    assert result.returncode == 0, result.stderr
    assert f"main address {hosts[0]}:" in result.stdout
    assert f"of: {' '.join(hosts)}" in result.stdout


def test_gpus_from_gpus_per_node_and_node_count_mismatch():
    result = _dry_run(SLURM_JOB_NODELIST="g[1-2]", SLURM_NNODES=2, SLURM_GPUS_PER_NODE="a100:4")
    assert "2 node(s) x 4 GPU(s) = 8 rank(s)" in result.stdout
    result = _dry_run(SLURM_JOB_NODELIST="g[1-2]", SLURM_NNODES=3)
    assert result.returncode == 2
    assert "names 2 host(s), SLURM_NNODES=3" in result.stderr


def test_extract_script_runs_only_extraction_and_matches_submitit():
    result = _dry_run("extract.sh", SLURM_JOB_NODELIST="g1", SLURM_NNODES=1, GPUS_PER_NODE=2)
    assert result.returncode == 0, result.stderr
    steps = _commands(result.stdout)
    assert len(steps) == 2 and "accelerate" not in result.stdout
    cfg = load_config(ROOT / "configs" / "inat2018.yaml")
    for step, split in zip(steps, ("train", "eval"), strict=True):
        bash_argv = step[step.index("-m") :]
        assert bash_argv == extract_argv(cfg, split)[1:]


def test_bad_override_stops_before_any_step():
    result = _dry_run(OVERRIDES="clip.nonsense=1")
    assert result.returncode == 2
    assert "unknown key(s) nonsense" in result.stderr and "valid keys" in result.stderr
    assert "+ srun" not in result.stdout


def test_each_node_runs_accelerate_launch_of_the_configured_python(tmp_path):
    """Not an `accelerate` found on PATH (another environment's, or none on the nodes): PYTHON's
    own `-m accelerate.commands.launch`, with the node's SLURM_NODEID as its machine rank."""
    variables = {"SLURM_JOB_NODELIST": "g[1-2]", "SLURM_NNODES": 2, "SLURM_GPUS_ON_NODE": 8}
    result = _dry_run(SLURM_NODEID=1, **variables)
    assert result.returncode == 0, result.stderr
    node = next(line for line in result.stdout.splitlines() if line.startswith("# node 1 runs:"))
    node_argv = shlex.split(node.split(":", 1)[1])
    assert node_argv[:5] == [*ACCELERATE_LAUNCH, "--machine_rank", "1"]
    # What srun starts on node 1, with PYTHON a stand-in that prints its arguments and a PATH
    # that holds no accelerate.
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    python.chmod(0o755)
    train = _commands(result.stdout)[-1]
    step = [str(python) if arg == sys.executable else arg for arg in train[train.index("bash") :]]
    started = subprocess.run(
        [shutil.which("bash"), *step[1:]],
        env={"PATH": str(tmp_path / "empty"), "SLURM_NODEID": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.splitlines() == node_argv[1:]


@pytest.mark.parametrize("job_id", [0, 777, 44999])
def test_main_port_default_lies_below_the_ephemeral_port_range(job_id):
    """Linux takes outgoing connections' ports from 32768-60999: one there can be in use."""
    result = _dry_run(SLURM_JOB_NODELIST="g1", SLURM_NNODES=1, SLURM_JOB_ID=job_id)
    assert result.returncode == 0, result.stderr
    port = int(_option(_commands(result.stdout)[-1], "--main_process_port"))
    assert port == 15000 + job_id % 15000
    assert f"main address g1:{port};" in result.stdout


class _FakeJob:
    """submitit.JobEnvironment of global rank 13, the 6th task on the 2nd of 2 nodes."""

    job_id = "4242_1"
    hostnames = ("g1", "g2")
    global_rank, local_rank, num_tasks, num_nodes = 13, 5, 16, 2


@pytest.mark.parametrize(("visible", "local_rank"), [(8, "5"), (1, "0"), (0, "5")])
def test_train_task_local_rank_is_a_device_index_the_task_has(monkeypatch, visible, local_rank):
    """All 8 GPUs visible to every task: its GPU is its local rank; bound one GPU per task
    (a single visible GPU): 0, not 5 ("invalid device ordinal"); no GPU: the local rank."""
    import submitit

    monkeypatch.setattr(submitit, "JobEnvironment", _FakeJob)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    env = TrainTask(["true"]).environment()
    assert env["LOCAL_RANK"] == local_rank
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("13", "16", "8")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("g1", str(15000 + 42421 % 15000))


def test_submit_writes_extraction_arrays_and_dependent_training_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = _slurm_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=tmp_path)
    result = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "candle_dist.cli",
                "submit",
                "--config",
                "configs/inat2018.yaml",
            ),
            *("--nodes", "2", "--gpus-per-node", "4", "--extract-tasks", "3"),
            *("--slurm-arg", "constraint=a100", f"train.output={tmp_path / 'run'}"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    train_array, val_array, training = (
        (tmp_path / f"sbatch-{n}.sh").read_text() for n in (1001, 1002, 1003)
    )
    for array in (train_array, val_array):
        assert "#SBATCH --array=0-2%3" in array
        assert "#SBATCH --gpus-per-node=1" in array
        assert "#SBATCH --constraint=a100" in array
    assert "#SBATCH --dependency=afterok:1001:1002" in training
    assert "#SBATCH --nodes=2" in training
    assert "#SBATCH --ntasks-per-node=4" in training
    assert "#SBATCH --gpus-per-node=4" in training
    assert "#SBATCH --signal=USR2@120" in training


# --- end to end ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Image shards and a tiny random CLIP checkpoint, made once for the module."""
    import open_clip

    from candle_dist.features import clip_loading  # noqa: F401  (registers tiny-clip)

    root = tmp_path_factory.mktemp("launch")
    assert (
        cli_main(
            [
                *("make-shards", "--synthetic", "--num-classes", "20", "--num-new", "4"),
                *("--max-per-class", "30", "--imbalance-ratio", "0.1", "--val-per-class", "3"),
                *("--samples-per-shard", "100", "--output", str(root / "shards")),
            ]
        )
        == 0
    )
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), root / "tiny-clip.pt")
    return root


def _overrides(problem: Path, run: Path) -> list[str]:
    """configs/demo.yaml on the module's shards, writing under `run`."""
    return [
        f"data.train_shards={problem}/shards/train-{{000000..000001}}.tar",
        f"data.val_shards={problem}/shards/val-{{000000..000000}}.tar",
        f"data.train={run}/features/train",
        f"data.val={run}/features/val",
        f"clip.pretrained={problem}/tiny-clip.pt",
        "clip.workers=0",
        "clip.batch_size=32",
        *_training_overrides(run),
    ]


def _training_overrides(run: Path) -> list[str]:
    return [
        "head.num_heads=4",
        "head.attn_dropout=0.0",  # dropout masks depend on the rank count
        "optim.epochs=10",
        "optim.batch_size=16",
        f"train.output={run}/out",
        "train.log_every=5",
        "train.checkpoint_every=1000",
    ]


def _wait_for_training(run: Path, process, min_step: int = 5, timeout: float = 240) -> None:
    metrics = run / "out" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1]).get("step", 0) >= min_step:
                return
        time.sleep(0.05)
    raise AssertionError("training did not start")


def _resumed_at(log: str) -> int:
    """The step the trainer resumed from, as it reports it ("resumed from ... at step N")."""
    line = next(line for line in log.splitlines() if "resumed from" in line)
    return int(line.rsplit("at step", 1)[1])


@pytest.fixture(scope="module")
def slurm_run(problem, submitit_run):
    """slurm/train_inat.sh on a fake 2-node SLURM, on the stores the submitit run extracted
    (so its extraction stage finds them complete): interrupted by SIGUSR1, then requeued."""
    run = problem / "slurm"
    bin_dir = problem / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = _slurm_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_SLURM_LOG=run / "slurm.log",
        SLURM_JOB_ID=4242,
        SLURM_JOB_NODELIST="localhost,localhost",
        SLURM_NNODES=2,
        SLURM_NODEID=0,
        GPUS_PER_NODE=1,
        CPUS_PER_NODE=1,
        MAIN_PORT=_free_port(),
        CONFIG="configs/demo.yaml",
        # the submitit run's stores, this run's output (later overrides win)
        OVERRIDES=" ".join(_overrides(problem, submitit_run["run"]) + _training_overrides(run)),
        OMP_NUM_THREADS=1,
    )
    run.mkdir()
    logs = []
    for attempt in ("first", "requeued"):
        log = run / f"{attempt}.log"
        with open(log, "w") as handle:
            job = subprocess.Popen(
                ["bash", "slurm/train_inat.sh"], cwd=ROOT, env=env, stdout=handle, stderr=handle
            )
            if attempt == "first":
                _wait_for_training(run, job)
                job.send_signal(signal.SIGUSR1)
            assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
        logs.append(log.read_text())
    return {"run": run, "logs": logs}


@pytest.fixture(scope="module")
def submitit_run(problem):
    """`candle-dist submit --local`: extraction array, then training interrupted by submitit's
    signal to rank 0 and requeued by submitit."""
    import submitit

    run = problem / "submitit"
    argv = [sys.executable, "-m", "candle_dist.cli", "submit", "--config", "configs/demo.yaml"]
    argv += ["--local", "--local-ranks", "2", "--extract-tasks", "2", "--folder", str(run / "logs")]
    run.mkdir()
    log = run / "submit.log"
    with open(log, "w") as handle:
        submit = subprocess.Popen(
            argv + _overrides(problem, run),
            cwd=ROOT,
            env=_slurm_env(OMP_NUM_THREADS=1),
            stdout=handle,
            stderr=handle,
        )
        _wait_for_training(run, submit)
        rank0 = [
            p
            for p in psutil.Process(submit.pid).children(recursive=True)
            if "submitit.core._submit" in " ".join(p.cmdline())
            and p.environ().get("SUBMITIT_LOCAL_GLOBALID") == "0"
        ]
        assert len(rank0) == 1
        rank0[0].send_signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))
        assert submit.wait(timeout=300) == 0, log.read_text()[-3000:]
    task_logs = {p.name: p.read_text() for p in (run / "logs").glob("*_log.*")}
    return {"run": run, "log": log.read_text(), "task_logs": task_logs}


def _final_head(run: Path) -> dict:
    return torch.load(run / "out" / "final" / "head.pt", weights_only=True)


def _total_steps(run: Path) -> int:
    return json.loads((run / "out" / "metrics.jsonl").read_text().splitlines()[-1])["step"]


@pytest.mark.slow
def test_slurm_script_requeues_on_sigusr1_and_resumes(slurm_run):
    run, (first, requeued) = slurm_run["run"], slurm_run["logs"]
    calls = (run / "slurm.log").read_text()
    assert calls.count("scontrol requeue 4242") == 1
    assert calls.count("srun --nodes=2 --ntasks=2 --ntasks-per-node=1") == 2  # one per attempt
    assert "is complete (manifest.json): skipping" in first
    assert "requeueing job 4242" in first
    assert 5 <= _resumed_at(requeued) < _total_steps(run)  # a checkpoint written on the signal
    assert (run / "out" / "eval.json").exists()


@pytest.mark.slow
def test_submitit_local_array_then_training_requeued(submitit_run):
    run, logs = submitit_run["run"], "".join(submitit_run["task_logs"].values())
    assert "Requeued job" in logs
    assert 5 <= _resumed_at(logs) < _total_steps(run)
    assert "rank 0/2" in logs and "rank 1/2" in logs  # the extraction array's two tasks
    assert "extract train: 2 task(s)" in submitit_run["log"]
    manifest = json.loads((run / "features" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 185 and manifest["num_skipped"] == 0
    assert (run / "out" / "eval.json").exists()


@pytest.mark.slow
def test_both_launchers_end_where_an_uninterrupted_run_ends(slurm_run, submitit_run, tmp_path):
    from candle_dist.train.data import eval_data_from_store, training_data_from_store
    from candle_dist.train.trainer import fit

    store = submitit_run["run"] / "features"
    cfg = load_config(ROOT / "configs" / "demo.yaml", _training_overrides(tmp_path))
    train = training_data_from_store(str(store / "train"))
    val = eval_data_from_store(str(store / "val"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched rank runs; more threads contend on 2 cores
    try:
        fit(cfg, train, val)
    finally:
        torch.set_num_threads(threads)
    straight = torch.load(tmp_path / "out" / "final" / "head.pt", weights_only=True)
    slurm, local = _final_head(slurm_run["run"]), _final_head(submitit_run["run"])
    for name, value in straight.items():
        torch.testing.assert_close(slurm[name], local[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(slurm[name], value, rtol=1e-4, atol=1e-5)
