"""The decoder head's training step at iNat 2018 size on this machine, P = 1 and P = 2.

python benchmarks/bench_decoder.py [--classes 8142 --tokens 50 --width 512 --batch 256]

A step = the decoder (3 pre-norm blocks, 4 heads, MLP ratio 0.5) over B images' T tokens, the
class-parallel C x D classifier, the LDAM-free cross-entropy (`cross_entropy`), backward,
replicated gradients summed, SGD with momentum. Each configuration runs in a fresh process
(P = 2 under torchrun, gloo) so its peak RSS is its own. The baseline in the same run is the
linear probe's step (the classifier alone, on pooled features) at the same C and B: the
decoder's cost is the difference. P = 2 must give the P = 1 losses and parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import write_section


def _worker(args: argparse.Namespace) -> None:
    """One configuration: timed steps, losses and a parameter checksum, as JSON (rank 0)."""
    import math

    import torch.distributed as dist

    from candle_dist.model.losses import build_loss
    from candle_dist.model.probe import ProbeHead
    from candle_dist.parallel.comm import ClassGroup
    from candle_dist.parallel.partition import Partition
    from candle_dist.train.optimizer import sum_replicated_gradients

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    comm = ClassGroup()
    g = torch.Generator().manual_seed(0)
    c, t, w, d, b = args.classes, args.tokens, args.width, args.dim, args.batch
    text = torch.randn(c, d, generator=g)
    projection = (torch.randn(w, d, generator=g) / math.sqrt(w), torch.zeros(d))
    torch.manual_seed(0)
    decoder = args.head == "decoder"
    head = ProbeHead(
        head_type=args.head,
        text_features=text,
        logit_scale=math.log(100.0),
        token_width=w if decoder else None,
        token_projection=projection if decoder else None,
        comm=comm,
    )
    counts = torch.randint(2, 1000, (c,), generator=g)
    criterion = build_loss("cross_entropy", counts)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    lo, hi = Partition(b, comm.world_size).range(comm.rank)
    sizes = Partition(b, comm.world_size).sizes
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        gs = torch.Generator().manual_seed(100 + step)
        shape = (b, t, w) if decoder else (b, d)
        inputs = torch.randn(shape, generator=gs)[lo:hi]
        labels = torch.randint(0, c, (b,), generator=gs)[lo:hi]
        start = time.perf_counter()
        loss, _ = head.loss(inputs, labels, criterion, image_sizes=sizes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_replicated_gradients(head)
        optimizer.step()
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(elapsed)
    full = head.full_state_dict()
    if comm.rank == 0:
        result = {
            "step_s": times,
            "losses": losses,
            "checksum": {k: float(v.double().abs().sum()) for k, v in full.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        Path(args.json).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(args: argparse.Namespace, head: str, ranks: int, out: Path) -> dict:
    here = Path(__file__).resolve()
    options = [
        "--worker", "--head", head, "--classes", str(args.classes), "--tokens", str(args.tokens),
        "--width", str(args.width), "--dim", str(args.dim), "--batch", str(args.batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    if ranks == 1:
        command = [sys.executable, str(here), *options]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", str(here), *options,
        ]  # fmt: skip
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=8142, help="classes C")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per image T")
    parser.add_argument("--width", type=int, default=512, help="token width W")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--batch", type=int, default=256, help="global batch B")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--head", default="decoder", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, head, ranks in (("linear", "linear", 1), ("decoder", "decoder", 1),
                                  ("decoder-P2", "decoder", 2)):  # fmt: skip
            res = _run(args, head, ranks, Path(tmp) / f"{name}.json")
            results[name] = res
            median = statistics.median(res["step_s"])
            rows.append(
                f"| {name} | {head} | {ranks} | {len(res['step_s'])} | {median:.3f} | "
                f"{res['peak_rss_mb'] / 1024:.2f} |"
            )
            print(rows[-1], flush=True)
    one, two = results["decoder"], results["decoder-P2"]
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"], strict=True))
    sum_diff = max(
        abs(two["checksum"][k] - v) / max(abs(v), 1e-30) for k, v in one["checksum"].items()
    )
    overhead = statistics.median(one["step_s"]) / statistics.median(results["linear"]["step_s"])
    c, t, w, b = args.classes, args.tokens, args.width, args.batch
    body = "\n".join(
        [
            f"C = {c:,}, T = {t} tokens of W = {w}, D = {args.dim}, B = {b}; fp32; a step = "
            "forward, cross-entropy, backward, replicated gradients summed, SGD.",
            "",
            "| run | head | P | timed steps | median s/step | peak RSS GB |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"- Decoder step / linear-probe step (the classifier alone) at the same C, B: "
            f"{overhead:.2f}x.",
            f"- P = 2 against P = 1, {len(one['losses'])} steps: largest relative loss difference "
            f"{loss_diff:.1e}, largest relative difference of a parameter tensor's |sum| after "
            f"the last step {sum_diff:.1e}.",
            "- P = 2 runs 2 processes (gloo, 1 thread each) on the same cores: a correctness "
            "run of the class-parallel path, not a scaling measurement.",
        ]
    )
    write_section("decoder-step", "Decoder head: one training step at iNat 2018 size (CPU)", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
