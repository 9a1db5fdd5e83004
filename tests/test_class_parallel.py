"""P class-parallel gloo ranks give the one-process Candle head: logits, loss, gradients, steps.

The head is checked for every mask mode and virtual init in fp64 (<= 1e-9 relative) and fp32
(<= 1e-5), with C = 11 classes (7 base) split unevenly and a batch of 7 split unevenly as the
trainer splits it, without and with attention dropout (its mask is keyed by global token ids, so
P ranks drop what one process drops); then `fit()` end to end: P = 2 equals P = 1, and a
checkpoint written by P = 2 resumes with P = 3 and P = 1 to the uninterrupted result.
"""

import itertools
import json
import shutil

import pytest
import torch
import torch.distributed as dist

from candle_dist.config import load_config
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.model.head import CandleHead
from candle_dist.model.losses import CompensatingLogitAdjustedLoss
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.partition import Partition
from candle_dist.train.data import training_data_from_synthetic
from candle_dist.train.optimizer import sum_replicated_gradients
from candle_dist.train.trainer import fit, predict_scores
from tests.dist_utils import run_in_processes

MASKS = ["none", "in_visual", "in_text", "between_visual_text"]
INITS = ["text", "visual"]
C, C_BASE, D, B, HEADS, STEPS = 11, 7, 16, 7, 4, 3
# float64 is the exactness check; float32 sums in another order over ranks, and three SGD steps at
# lr 0.5 compound that (fusion.ratio's gradient, one scalar summed over every token, reached
# 1.1e-5 at P = 3 on torch 2.14.1)
TOLERANCE = {"float64": 1e-9, "float32": 5e-5}
# (dtype, mask, init, batch, attention dropout); batch 2 leaves a rank without images when P = 3
CASES = [(dt, m, i, B, 0.0) for dt, m, i in itertools.product(TOLERANCE, MASKS, INITS)]
CASES += [(dt, m, "text", B, 0.3) for dt, m in itertools.product(TOLERANCE, MASKS)]
CASES += [
    ("float64", "in_visual", "text", 2, 0.0),
    ("float64", "between_visual_text", "visual", 2, 0.3),
]
SHARDED = "virtual_prototypes"


def _problem(dtype: torch.dtype, batch: int):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(C, D, generator=g, dtype=torch.float64)
    protos = torch.randn(C_BASE, D, generator=g, dtype=torch.float64) + 0.5
    feats = torch.randn(batch, D, generator=g, dtype=torch.float64) + 0.5
    labels = torch.randint(0, C_BASE, (batch,), generator=g)
    counts = torch.tensor([50, 20, 9, 5, 3, 2, 1] + [0] * (C - C_BASE))
    return text.to(dtype), protos.to(dtype), feats.to(dtype), labels, counts


def _run_case(comm: ClassGroup, case: tuple) -> dict:
    """K SGD steps of the head on this rank's share of the batch; what every step produced."""
    dtype_name, mask, init, batch, dropout = case
    text, protos, feats, labels, counts = _problem(getattr(torch, dtype_name), batch)
    torch.manual_seed(1)  # the same fusion weights and "visual" noise on every rank
    head = CandleHead(
        text_features=text,
        visual_prototypes=protos,
        logit_scale=2.0,
        visual_scale=0.7,
        mask=mask,
        virtual_init=init,
        num_heads=HEADS,
        attn_dropout=dropout,
        comm=comm,
        chunk_rows=5,
    )
    with torch.no_grad():  # non-zero biases, so that their gradients say something
        for bias in (head.fusion.attn.in_proj_bias, head.fusion.attn.out_proj.bias):
            bias.normal_(std=0.1)
    criterion = CompensatingLogitAdjustedLoss(counts)
    lo, hi = Partition(batch, comm.world_size).range(comm.rank)  # as trainer.fit shares a batch
    feats, labels = feats[lo:hi], labels[lo:hi]
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    steps = []
    for _ in range(STEPS):
        with torch.no_grad():
            record = {phase: [t.clone() for t in head(feats, phase)] for phase in ("train", "test")}
        loss, _ = head.loss(feats, labels, criterion)
        optimizer.zero_grad()
        loss.backward()
        sum_replicated_gradients(head)
        optimizer.step()
        record["loss"] = loss.detach()
        record["grads"] = {n: p.grad.clone() for n, p in head.named_parameters()}
        record["params"] = {n: p.detach().clone() for n, p in head.named_parameters()}
        steps.append(record)
    return {
        "steps": steps,
        "scores": predict_scores(head, feats),
        "state": head.full_state_dict(),
        "classes": (head.class_start, head.class_stop),
    }


def _equivalence_worker(rank: int, world_size: int) -> dict:
    comm = ClassGroup()
    assert (comm.rank, comm.world_size, comm.distributed) == (rank, world_size, True)
    return {case: _run_case(comm, case) for case in CASES}


@pytest.fixture(scope="module")
def one_rank() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only cost time on a busy machine
    try:
        return {case: _run_case(ClassGroup(distributed=False), case) for case in CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
def ranks(request) -> list[dict]:
    """Every rank's records for every case, from one group of P processes."""
    return run_in_processes(_equivalence_worker, request.param)


def _close(mine: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = float((mine - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _virtual_rows(start: int, stop: int) -> slice:
    """Rows of the full virtual_prototypes (classes C_BASE..C-1) in class range [start, stop)."""
    return slice(max(start, C_BASE) - C_BASE, max(stop, C_BASE) - C_BASE)


def _layout_worker(rank: int, world_size: int) -> dict[str, int]:
    """Rows of each non-fusion state entry on this rank."""
    text, protos, *_ = _problem(torch.float64, B)
    head = CandleHead(
        text_features=text, visual_prototypes=protos, logit_scale=2.0, comm=ClassGroup()
    )
    state = head.state_dict()
    return {name: len(value) for name, value in state.items() if not name.startswith("fusion")}


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_holds_exactly_its_classes(world_size):
    shards = run_in_processes(_layout_worker, world_size)
    for rank, rows in enumerate(shards):
        start, stop = Partition(C, world_size).range(rank)
        expected = {
            "text_features": stop - start,
            "visual_prototypes": max(0, min(stop, C_BASE) - start),
            "virtual_prototypes": max(stop, C_BASE) - max(start, C_BASE),
            "proj_image": D,
            "proj_text": D,
        }
        assert rows == expected, f"rank {rank} of {world_size} (classes {start}..{stop - 1})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ranks_match_one_rank(ranks, one_rank, case):
    world_size, tol, ref = len(ranks), TOLERANCE[case[0]], one_rank[case]
    for rank, result in enumerate(ranks):
        mine = result[case]
        start, stop = Partition(C, world_size).range(rank)
        assert mine["classes"] == (start, stop)
        where = f"P={world_size} rank {rank}"
        for step, (got, want) in enumerate(zip(mine["steps"], ref["steps"], strict=True)):
            at = f"{where} step {step}"
            for phase in ("train", "test"):  # columns are this rank's classes
                for i, (logits, full) in enumerate(zip(got[phase], want[phase], strict=True)):
                    _close(logits, full[:, start:stop], tol, f"{at} {phase} logits {i}")
            _close(got["loss"], want["loss"], tol, f"{at} loss")
            for kind in ("grads", "params"):
                for name, full in want[kind].items():
                    full = full[_virtual_rows(start, stop)] if name == SHARDED else full
                    _close(got[kind][name], full, tol, f"{at} {kind} {name}")
        _close(mine["scores"], ref["scores"], tol, f"{where} predict_scores")
        assert mine["state"].keys() == ref["state"].keys()
        for name, full in ref["state"].items():
            _close(mine["state"][name], full, tol, f"{where} full_state_dict {name}")


# ------------------------------------------------------------------------ trainer end to end
FIT_OVERRIDES = [
    "head.attn_dropout=0.1",
    "head.num_heads=4",
    "head.chunk_rows=5",
    "head.mask=in_visual",
    "optim.batch_size=7",  # 23 samples: batches of 7, 7, 7, 2 (a rank without images at P=3)
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "optim.lr=0.01",
    "train.log_every=1",
    "train.eval_batch_size=5",
    "train.eval_every_epoch=true",  # collectives in mid-run evaluation must pair up on every rank
    # draws with replacement: the same global batches for any rank count, resumed mid-epoch
    "train.sampler=class_balanced",
]
TOTAL_STEPS, RESUME_AT = 8, 3


def _synthetic():
    return make_synthetic_features(
        C, D, num_new=C - C_BASE, max_count=7, imbalance_ratio=7.0, val_per_class=2, seed=0
    )


def _fit_worker(rank: int, world_size: int, jobs: list[tuple[str, int | None, bool]]) -> dict:
    """fit() for each (output, max_steps, resume) in turn; Accelerate creates the gloo group."""
    train, val = training_data_from_synthetic(_synthetic())
    results = []
    for output, max_steps, resume in jobs:
        cfg = load_config(None, [*FIT_OVERRIDES, f"train.output={output}"])
        results.append(fit(cfg, train, val, resume=resume, max_steps=max_steps))
    group = (dist.get_world_size(), dist.get_backend()) if dist.is_initialized() else None
    return {"results": results, "group": group}


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory) -> dict:
    """Output folders of: P=1 and P=2 uninterrupted; P=2 stopped after RESUME_AT steps and its
    checkpoint resumed with P=3 and P=1."""
    root = tmp_path_factory.mktemp("fit")
    runs = {name: root / name for name in ("p1", "p2", "p2_part", "p3_resumed", "p1_resumed")}
    jobs = [(str(runs["p2"]), None, False), (str(runs["p2_part"]), RESUME_AT, False)]
    two = run_in_processes(_fit_worker, 2, jobs, init_group=False)
    assert all(rank["group"] == (2, "gloo") for rank in two), "Accelerate set up no gloo group"
    for name in ("p3_resumed", "p1_resumed"):
        shutil.copytree(runs["p2_part"], runs[name])
    jobs = [(str(runs["p1"]), None, False), (str(runs["p1_resumed"]), None, True)]
    run_in_processes(_fit_worker, 1, jobs, init_group=False)
    jobs = [(str(runs["p3_resumed"]), None, True)]
    three = run_in_processes(_fit_worker, 3, jobs, init_group=False)
    assert all(rank["group"] == (3, "gloo") for rank in three)
    return runs


def _head(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "final" / "head.pt", weights_only=True)


def _losses(run) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _same_metrics(mine: dict, want: dict) -> None:
    """Counts-based metrics exactly (the same predictions on every image); the eval loss, a
    float sum over ranks' scores, to float32 rounding."""
    assert mine.keys() == want.keys()
    assert mine["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    assert {k: v for k, v in mine.items() if k != "eval_loss"} == {
        k: v for k, v in want.items() if k != "eval_loss"
    }


def _same_run(run, ref) -> None:
    mine, want = _head(run), _head(ref)
    assert mine.keys() == want.keys()
    for name, tensor in want.items():
        _close(mine[name], tensor, 1e-5, f"{run.name} head.pt {name}")
    steps, losses = zip(*_losses(run), strict=True)
    ref_steps, ref_losses = zip(*_losses(ref), strict=True)
    assert steps == ref_steps == tuple(range(1, TOTAL_STEPS + 1))
    _close(torch.tensor(losses), torch.tensor(ref_losses), 1e-5, f"{run.name} losses")
    # the same predictions on every validation image (counts-based metrics, so exact)
    evaluations = [json.loads((path / "eval.json").read_text()) for path in (run, ref)]
    _same_metrics(*evaluations)


def test_fit_with_two_ranks_equals_one_rank(fit_runs):
    state = _head(fit_runs["p1"])
    assert not torch.allclose(state["proj_image"], torch.eye(D))  # it did train
    _same_run(fit_runs["p2"], fit_runs["p1"])


def _epoch_evaluations(run) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["eval"] for r in map(json.loads, lines) if "eval" in r}


def test_evaluation_every_epoch_is_the_same_with_one_two_and_three_ranks(fit_runs):
    """Every rank evaluates (rank 0 writes); P = 3 evaluates after resuming P = 2's step 3."""
    want = _epoch_evaluations(fit_runs["p1"])
    assert sorted(want) == [TOTAL_STEPS // 2, TOTAL_STEPS]
    for run in ("p2", "p3_resumed"):
        got = _epoch_evaluations(fit_runs[run])
        assert sorted(got) == sorted(want)
        for step, metrics in want.items():
            _same_metrics(got[step], metrics)


def test_checkpoint_of_two_ranks_resumes_with_three_and_one(fit_runs):
    latest = fit_runs["p2_part"] / "checkpoints" / "latest"
    checkpoint = latest.parent / latest.read_text().strip()
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == RESUME_AT
    names = {path.name for path in checkpoint.iterdir()}
    assert {"head.pt", "optimizer.pt", "shard-000-of-002.pt", "shard-001-of-002.pt"} <= names
    assert not (fit_runs["p2_part"] / "final").exists()
    _same_run(fit_runs["p3_resumed"], fit_runs["p1"])
    _same_run(fit_runs["p1_resumed"], fit_runs["p1"])
