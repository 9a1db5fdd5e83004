"""A training step of the trainer on fake CUDA with a fake 2-rank process group, no GPU needed.

Under torch's `FakeTensorMode` tensors carry a device and a shape but no data, so tensors can
live on "cuda" here, and an op mixing them with CPU tensors raises, as it would on a GPU. The
process group is torch's "fake" backend (world size 2, this process rank 0), and every
collective is checked to get tensors on the accelerator's device: NCCL refuses CPU tensors,
while gloo, which the other distributed tests use, accepts them.

Values cannot be read in this mode (no data), so the step runs the trainer's own functions in
the order `fit` calls them, minus logging and metrics: head construction on the device, loss,
backward, optimizer (replicated gradients summed), the stop-flag vote, checkpoint gathering
(momentum and full state) and evaluation scoring.

One limit: torch's autograd engine (2.11 and later) asks the CUDA driver whether a device has a
context before it runs a backward on CUDA tensors, so backward cannot run on fake CUDA without
a GPU. The step therefore runs twice: on fake "cuda" up to the loss (CUDA's own code paths:
fused attention, the pinned stop-flag copy), and whole, backward and optimizer included, on
fake "meta", where a CPU tensor made in a backward raises the same device mismatch.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from candle_dist.config import load_config
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.model import head as head_module
from candle_dist.model import heads
from candle_dist.model.losses import build_loss
from candle_dist.model.softmax_dropout import DropoutKeys
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.partition import Partition
from candle_dist.train import trainer
from candle_dist.train.data import training_data_from_synthetic
from candle_dist.train.optimizer import build_optimizer

CUDA = torch.device("cuda", 0)
DEVICES = [CUDA, torch.device("meta")]
WORLD = 2
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter")


class _DeviceMismatch(AssertionError):
    """A collective got a tensor that is not on the group's (CUDA) device."""


@pytest.fixture(params=DEVICES, ids=lambda d: d.type)
def device(request) -> torch.device:
    return request.param


@pytest.fixture
def fake_group(monkeypatch, device):
    """A fake process group of WORLD ranks whose collectives fail on tensors not on `device`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    seen: list[str] = []

    def checked(name, collective):
        def wrapper(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            for a in args:
                if isinstance(a, list):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.device.type != device.type:
                    raise _DeviceMismatch(f"{name} got a tensor on {t.device}, not {device}")
            seen.append(name)
            return collective(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, checked(name, getattr(dist, name)))
    try:
        yield seen
    finally:
        dist.destroy_process_group()


@pytest.fixture
def data():
    synthetic = make_synthetic_features(
        24, 32, num_new=4, max_count=12, imbalance_ratio=6, val_per_class=2, seed=0
    )
    train, val = training_data_from_synthetic(synthetic)
    return train, val


def _host_work_on_real_data(monkeypatch):
    """Class means (from the memory-mapped store) and input validation (NaN checks) read values:
    run them on the real CPU data, as they run before anything reaches the GPU."""

    def real(module, name):
        original = getattr(module, name)

        def on_real_data(*args, **kwargs):
            with unset_fake_temporarily():
                return original(*args, **kwargs)

        monkeypatch.setattr(module, name, on_real_data)

    real(head_module, "_check_class_tensors")
    real(heads, "class_means")
    draw = DropoutKeys.draw.__func__  # the attention-dropout seed, an int drawn on the host

    def draw_on_host(cls, *args):
        with unset_fake_temporarily():
            return draw(cls, *args)

    monkeypatch.setattr(DropoutKeys, "draw", classmethod(draw_on_host))
    # the stop vote's copy-done event needs a driver; the pinned copy itself runs
    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)


class _HostEvent:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("mask", ["none", "in_visual"])
def test_training_step_on_a_fake_device_with_two_ranks(
    fake_group, device, data, monkeypatch, tmp_path, mask
):
    train, val = data
    _host_work_on_real_data(monkeypatch)
    cfg = load_config(
        None,
        [
            f"head.mask={mask}",
            "head.num_heads=4",
            "optim.batch_size=10",
            f"train.output={tmp_path}",
        ],
    )
    accelerator = SimpleNamespace(
        device=device, distributed_type="MULTI_GPU", autocast=contextlib.nullcontext
    )
    with FakeTensorMode(allow_non_fake_inputs=True):
        comm = ClassGroup(device=device)
        assert (comm.world_size, comm.rank) == (WORLD, 0)
        head = trainer.build_head(cfg, train, comm, device)
        assert all(t.device.type == device.type for t in [*head.parameters(), *head.buffers()])
        with unset_fake_temporarily():  # from the counts, on the host
            criterion = build_loss(cfg.loss.name, train.counts, tau=cfg.loss.tau)
        criterion = criterion.to(device)
        optimizer, autocast = build_optimizer(head, cfg, accelerator)
        if device.type == "cuda":  # no backward on fake CUDA (module docstring)
            monkeypatch.setattr(optimizer, "backward_and_step", lambda loss: None)

        shares = Partition(cfg.optim.batch_size, WORLD)
        lo, hi = shares.range(comm.rank)
        features = train.rows(np.arange(lo, hi)).to(device)
        labels = torch.as_tensor(train.labels[lo:hi], dtype=torch.long, device=device)
        loss, parts = trainer.train_step(
            head, optimizer, autocast, criterion, features, labels, None, shares.sizes
        )
        assert loss.device.type == device.type and set(parts) == {"loss0", "loss_vt", "loss_vv"}
        grads = [p.grad for p in head.parameters() if p.grad is not None]
        assert all(g.device.type == device.type for g in grads)
        assert len(grads) == (0 if device.type == "cuda" else len(list(head.parameters())))

        stop = trainer._StopFlag()
        assert stop.agreed(comm) is False  # the first vote is started, nothing read yet

        momentum = optimizer.momentum()  # checkpoint gathering (collective)
        state = head.full_state_dict()
        assert state["virtual_prototypes"].shape[0] == train.num_classes - train.num_base_classes
        assert all(t.device.type == "cpu" for t in [*momentum.values(), *state.values()])

        shares = Partition(6, WORLD)
        lo, hi = shares.range(comm.rank)
        rows = torch.as_tensor(val.features[lo:hi]).to(device)
        scores = trainer.predict_scores(head, rows, shares.sizes)
        assert scores.shape == (6, train.num_classes) and scores.device.type == device.type
    assert {"all_reduce", "all_gather"} <= set(fake_group)


@pytest.mark.parametrize("head_type", ["decoder", "linear"])
def test_baseline_head_step_on_a_fake_device_with_two_ranks(
    fake_group, device, data, monkeypatch, tmp_path, head_type
):
    """The decoder and linear heads: parameters, step, checkpoint gathering and scoring."""
    train, val = data
    tokens = np.repeat(np.asarray(train.features, dtype=np.float16)[:, None], 3, axis=1)
    train.tokens = tokens
    _host_work_on_real_data(monkeypatch)
    cfg = load_config(
        None, [f"head.type={head_type}", "optim.batch_size=10", f"train.output={tmp_path}"]
    )
    accelerator = SimpleNamespace(
        device=device, distributed_type="MULTI_GPU", autocast=contextlib.nullcontext
    )
    with FakeTensorMode(allow_non_fake_inputs=True):
        comm = ClassGroup(device=device)
        head = trainer.build_head(cfg, train, comm, device)
        assert all(t.device.type == device.type for t in [*head.parameters(), *head.buffers()])
        with unset_fake_temporarily():
            criterion = build_loss("logit_adjusted", train.counts)
        criterion = criterion.to(device)
        optimizer, autocast = build_optimizer(head, cfg, accelerator)
        if device.type == "cuda":
            monkeypatch.setattr(optimizer, "backward_and_step", lambda loss: None)
        shares = Partition(cfg.optim.batch_size, WORLD)
        lo, hi = shares.range(comm.rank)
        inputs = trainer.training_inputs(head, train, np.arange(lo, hi)).to(device)
        labels = torch.as_tensor(train.labels[lo:hi], dtype=torch.long, device=device)
        loss, _ = trainer.train_step(
            head, optimizer, autocast, criterion, inputs, labels, None, shares.sizes
        )
        assert loss.device.type == device.type
        grads = [p.grad for p in head.parameters() if p.grad is not None]
        assert all(g.device.type == device.type for g in grads)
        state = head.full_state_dict()
        assert state["weight"].shape == (train.num_classes, train.text_features.shape[1])
        val.tokens = np.repeat(np.asarray(val.features, dtype=np.float16)[:, None], 3, axis=1)
        shares = Partition(6, WORLD)
        lo, hi = shares.range(comm.rank)
        rows = trainer.eval_inputs(head, val, lo, hi).to(device)
        scores = trainer.predict_scores(head, rows, shares.sizes)
        assert scores.shape == (6, train.num_classes) and scores.device.type == device.type


def test_a_cpu_tensor_in_a_collective_fails_the_dry_run(fake_group, device):
    """The check the dry run relies on: what gloo would accept and NCCL refuse is caught."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(_DeviceMismatch, match="all_reduce got a tensor on cpu"):
            dist.all_reduce(torch.tensor([1.0]))  # the stop flag as it was built before
        comm = ClassGroup(device=device)
        with pytest.raises(
            RuntimeError, match=f"on cpu handed to a collective .* on {device.type}"
        ):
            comm.all_reduce(torch.zeros(3))
        dist.all_reduce(torch.zeros(3, device=device))
