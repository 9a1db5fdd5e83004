"""The baseline heads (linear probe, token decoder) and their second-stage calibrations against
dense float64 formulas; class-parallel with P = 2, 3 gloo ranks equal to one process; an
untrained text-initialized decoder scores as zero-shot; bf16 autocast close to float64."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from candle_dist.model.losses import build_loss
from candle_dist.model.probe import ProbeHead
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.partition import Partition
from candle_dist.train.optimizer import sum_replicated_gradients
from tests.dist_utils import run_in_processes

C, D, T, W = 11, 16, 5, 24
COUNTS = torch.tensor([50, 20, 9, 5, 3, 2, 1, 4, 7, 3, 2])
LOSSES = [
    ("cross_entropy", {}),
    ("logit_adjusted", {"tau": 1.0}),
    ("ldam", {}),
    ("lade", {}),
    ("grw", {"exp_scale": 1.2}),
]
CALIBRATIONS = ["none", "lws", "marc", "disalign"]


def _tensors(dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "text": torch.randn(C, D, generator=g, dtype=dtype),
        "features": torch.randn(9, D, generator=g, dtype=dtype),
        "tokens": torch.randn(9, T, W, generator=g, dtype=dtype),
        "projection": (torch.randn(W, D, generator=g) / W**0.5, torch.randn(D, generator=g) * 0.1),
        "labels": torch.randint(0, C, (9,), generator=g),
    }


def _head(kind: str, calibration: str = "none", comm=None, init="text"):
    """A head away from its identity start (so every term matters), the same over ranks: the
    one-process head's perturbed state loaded into this rank's shard."""
    data = _tensors()

    def build(group):
        torch.manual_seed(3)
        return ProbeHead(
            head_type=kind,
            text_features=data["text"],
            logit_scale=math.log(20.0),
            init=init,
            calibration=calibration,
            token_width=W if kind == "decoder" else None,
            token_projection=data["projection"] if kind == "decoder" else None,
            depth=2,
            decoder_heads=4,
            comm=group,
            chunk_rows=4,
        ).double()

    single = build(None)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in single.named_parameters():
            if name != "weight":
                param.add_(0.1 * torch.randn(param.shape, generator=g, dtype=torch.float64))
    if comm is None:
        return single, data
    head = build(comm)
    head.load_full_state_dict(single.full_state_dict())
    return head, data


def _dense_scores(head: ProbeHead, inputs: torch.Tensor) -> torch.Tensor:
    """The docstring's formulas, one class column at a time, without the folded columns."""
    f = head.decoder(inputs) if head.decoder is not None else inputs
    f = F.normalize(f, dim=-1)
    w, b = head.weight, head.bias
    z = f @ w.t() + b
    if head.calibration == "lws":
        return head.class_scale * z
    if head.calibration == "marc":
        return head.marc_scale * z + head.marc_bias * w.norm(dim=1)
    if head.calibration == "disalign":
        g = torch.sigmoid(head.gate(f))
        return (1 - g) * z + g * (head.align_scale * z + head.align_bias)
    return z


@pytest.mark.parametrize("kind", ["linear", "decoder"])
@pytest.mark.parametrize("calibration", CALIBRATIONS)
@pytest.mark.parametrize("loss", LOSSES, ids=lambda case: case[0])
def test_loss_and_gradients_equal_the_dense_formula(kind, calibration, loss):
    head, data = _head(kind, calibration)
    inputs = data["tokens"] if kind == "decoder" else data["features"]
    criterion = build_loss(loss[0], COUNTS, **loss[1]).double()
    value, _ = head.loss(inputs, data["labels"], criterion)
    grads = torch.autograd.grad(value, list(head.parameters()))
    dense = criterion(_dense_scores(head, inputs), data["labels"])
    dense_grads = torch.autograd.grad(dense, list(head.parameters()))
    assert torch.allclose(value, dense, rtol=1e-10, atol=0)
    for name, mine, ref in zip(dict(head.named_parameters()), grads, dense_grads, strict=True):
        assert torch.allclose(mine, ref, rtol=1e-8, atol=1e-12), name
    scores = head.scores(inputs)
    assert torch.allclose(scores.double(), _dense_scores(head, inputs), rtol=1e-6, atol=1e-5)


def test_calibrations_start_as_the_identity():
    base, data = _head("linear")
    for calibration in CALIBRATIONS[1:]:
        head = ProbeHead(
            head_type="linear", text_features=data["text"], logit_scale=math.log(20.0),
            calibration=calibration,
        ).double()  # fmt: skip
        head.load_full_state_dict(base.full_state_dict(), strict=False)
        assert torch.allclose(head.scores(data["features"]), base.scores(data["features"]))


def test_untrained_text_decoder_scores_as_zero_shot():
    """Zero-initialized residual branches and the tower's projection: the decoder's embedding
    is token 0 mapped by the recorded projection, scored by s * cos against the texts."""
    data = _tensors(torch.float32)
    head = ProbeHead(
        head_type="decoder",
        text_features=data["text"].float(),
        logit_scale=math.log(100.0),
        token_width=W,
        token_projection=data["projection"],
    )
    tokens = data["tokens"].float()
    image = tokens[:, 0] @ data["projection"][0] + data["projection"][1]
    zero_shot = 100.0 * F.normalize(image, dim=-1) @ F.normalize(data["text"].float(), dim=-1).t()
    assert torch.allclose(head.scores(tokens), zero_shot, atol=1e-4)


def test_random_init_does_not_depend_on_the_rank_count_and_has_the_text_norm():
    head, _ = _head("linear", init="random")
    norms = head.weight.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 20.0), rtol=0.05)  # +0.1 noise added


def test_tau_normalization_divides_rows_by_their_norm_power():
    head, data = _head("linear")
    before = head.scores(data["features"])
    norms = head.weight.norm(dim=1).detach().clone()
    head.tau_normalize(1.0)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(C, dtype=torch.float64))
    assert torch.allclose(head.scores(data["features"]).double(), before / norms, atol=1e-5)


def test_wrong_inputs_are_clear_errors():
    from candle_dist.errors import UserInputError

    head, data = _head("decoder")
    with pytest.raises(UserInputError, match=r"expected \[batch, tokens, width\]"):
        head.scores(data["features"])
    with pytest.raises(UserInputError, match="width 7 but the decoder was built for 24"):
        head.scores(torch.zeros(2, 3, 7, dtype=torch.float64))
    with pytest.raises(UserInputError, match="decoder_heads=5"):
        ProbeHead(head_type="decoder", text_features=data["text"], logit_scale=1.0,
                  token_width=W, decoder_heads=5)  # fmt: skip


def _rank_case(comm: ClassGroup, kind: str, calibration: str, loss: str) -> dict:
    head, data = _head(kind, calibration, comm=comm)
    inputs = data["tokens"] if kind == "decoder" else data["features"]
    sizes = Partition(9, comm.world_size).sizes
    lo, hi = Partition(9, comm.world_size).range(comm.rank)
    criterion = build_loss(loss, COUNTS).double()
    value, _ = head.loss(inputs[lo:hi], data["labels"][lo:hi], criterion, image_sizes=sizes)
    value.backward()
    sum_replicated_gradients(head)
    grads = {}
    for name, param in head.named_parameters():
        if param.grad is not None:
            full = name in head.class_sharded_ranges()
            grads[name] = head.gather_full(name, param.grad) if full else param.grad.clone()
    scores = head.scores(inputs[lo:hi], sizes)
    columns = head.comm.gather_constant(scores.t().contiguous(), head.class_partition.sizes).t()
    return {"loss": value.detach(), "grads": grads, "scores": columns.detach()}


PARALLEL_CASES = [
    ("decoder", "none", "lade"),
    ("decoder", "disalign", "grw"),
    ("linear", "marc", "ldam"),
    ("linear", "lws", "logit_adjusted"),
]


def _cases(comm: ClassGroup) -> list[dict]:
    return [_rank_case(comm, *case) for case in PARALLEL_CASES]


def _worker(rank: int, world_size: int) -> list[dict]:
    return _cases(ClassGroup())


@pytest.mark.parametrize("world_size", [2, 3])
def test_class_parallel_equals_one_process(world_size):
    reference = _cases(ClassGroup(distributed=False))
    for results in run_in_processes(_worker, world_size):
        for case, mine, ref in zip(PARALLEL_CASES, results, reference, strict=True):
            assert torch.allclose(mine["loss"], ref["loss"], rtol=1e-10), case
            assert mine["grads"].keys() == ref["grads"].keys(), case
            for name in ref["grads"]:
                assert torch.allclose(mine["grads"][name], ref["grads"][name], rtol=1e-8,
                                      atol=1e-12), (case, name)  # fmt: skip
            assert torch.allclose(mine["scores"], ref["scores"], rtol=1e-6, atol=1e-6), case


@pytest.mark.parametrize("kind", ["linear", "decoder"])
def test_bf16_autocast_loss_is_close_to_float64(kind):
    head64, data = _head(kind, "disalign")
    head32 = copy.deepcopy(head64).float()
    inputs = data["tokens"] if kind == "decoder" else data["features"]
    criterion = build_loss("logit_adjusted", COUNTS)
    reference, _ = head64.loss(inputs, data["labels"], criterion.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, _ = head32.loss(inputs.float(), data["labels"], criterion)
    assert value.dtype == torch.float32
    assert abs(value.item() - reference.item()) / reference.item() < 0.02
