"""The Candle training loop on Accelerate: data-parallel over samples, class-parallel over classes.

Every rank draws the same global batch (same seed) and keeps its contiguous share of it, so a
run with P ranks sees exactly the batches of a one-rank run. Replicated parameters (projections,
fusion) have their gradients summed across ranks: each rank's loss is the global loss, and its
gradient holds only the contributions of its own rows and classes. DDP (which averages) is
therefore not used; Accelerate provides the process group, device and autocast.

Under `accelerate launch` with a DeepSpeed config (launch/deepspeed_zero2.yaml), DeepSpeed
ZeRO-1/2 holds the replicated parameters' optimizer state, sharded over ranks, and reduces their
gradients; the class-sharded parameters keep a local SGD. Both give the same steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from candle_dist import provenance as prov
from candle_dist.classifier import export_classifier
from candle_dist.config import Config
from candle_dist.errors import UserInputError
from candle_dist.eval.metrics import MetricAccumulator, to_json
from candle_dist.model.head import CandleHead
from candle_dist.model.heads import build_head, candle_options
from candle_dist.model.losses import build_loss, loss_options
from candle_dist.model.probe import ProbeHead
from candle_dist.outputs import check_output_dir, staged_dir
from candle_dist.parallel.comm import ClassGroup
from candle_dist.parallel.partition import Partition
from candle_dist.precision import resolve_precision
from candle_dist.train import checkpoint as ckpt
from candle_dist.train.data import EvalData, TrainingData, require_tokens, validate
from candle_dist.train.optimizer import HeadSGD, build_optimizer, skip_deepspeed_shm_build
from candle_dist.train.sampler import epoch_indices
from candle_dist.train.schedule import learning_rate
from candle_dist.train.tracking import PROJECT, check_trackers, eval_scalars, hyperparameters

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written on a signal, requeue and --resume
INTERRUPT_NOTE = (  # on a line of its own after the progress bar's
    "\ncandle-dist train: Ctrl-C: stopping after this step with a checkpoint (press Ctrl-C again "
    "to stop at once, without one)\n"
)


class Preempted(Exception):
    """Raised after a checkpoint was written because SIGUSR1, SIGTERM or SIGINT arrived."""


def make_accelerator(
    precision: str = "auto",
    dist_timeout_minutes: float = 60.0,
    log_with: list[str] | None = None,
    project_dir: str | None = None,
):
    """An Accelerator that really has N ranks under `accelerate launch`/torchrun, GPU or not,
    with bf16 autocast where `precision` resolves to it (candle_dist.precision), the process
    group's collective timeout set to `dist_timeout_minutes`, and the experiment trackers
    `log_with` writing under `project_dir` (candle_dist.train.tracking)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if not dist_timeout_minutes > 0:
        raise UserInputError(
            f"train.dist_timeout_minutes={dist_timeout_minutes} must be positive (minutes a rank "
            "waits in a collective; NCCL's default is 10)"
        )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    mixed = "bf16" if resolve_precision(precision, device, "train.precision") == "bf16" else "no"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed:
        skip_deepspeed_shm_build()
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=dist_timeout_minutes))
    # cpu=True is how Accelerate sets up gloo ranks without GPUs, but it also turns DeepSpeed off;
    # DeepSpeed sets up its own group (gloo on CPU).
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=mixed,
        kwargs_handlers=[timeout],
        log_with=check_trackers(log_with or []) or None,
        project_dir=project_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Under DeepSpeed on CPU, Accelerate reports one process whatever the group: ask torch.
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    if launched > 1 and ranks != launched:
        raise UserInputError(
            f"launched with WORLD_SIZE={launched} but Accelerate set up {ranks} process(es); "
            "on machines without GPUs launch with `accelerate launch --multi_gpu "
            "--num_processes N`, `torchrun --nproc_per_node N` or a DeepSpeed config"
        )
    return accelerator


class _StopFlag:
    """Set by SIGUSR1/SIGTERM/SIGINT; agreed on across ranks at step boundaries, one step late.

    Every step all-reduces (MAX) this rank's flag on the collective device and copies the vote
    to the host without waiting; the next step boundary reads it, by when the copy is long done.
    So a GPU never idles for a per-step host sync, and all ranks stop at the same step: one
    after the first step boundary that saw the signal on some rank.

    Ctrl-C (SIGINT) stops like a preemption, with a checkpoint; pressed again it stops at once
    (KeyboardInterrupt), leaving the checkpoints written so far. `release_interrupt` gives
    SIGINT back its previous handler once the training loop is over.
    """

    def __init__(self, announce: bool = True) -> None:
        self.raised = False
        self.signal_name: str | None = None  # the first signal this rank received
        self._interrupts = 0
        self._announce = announce
        self._vote: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self._previous_interrupt = signal.getsignal(signal.SIGINT)
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                self.release_interrupt()
                raise KeyboardInterrupt
            if self._announce:
                os.write(2, INTERRUPT_NOTE.encode())
        self.signal_name = self.signal_name or signal.Signals(signum).name
        self.raised = True

    def release_interrupt(self) -> None:
        previous = self._previous_interrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)

    def agreed(self, comm: ClassGroup) -> bool:
        """Whether some rank had seen a signal at the previous step boundary (the vote is
        started here for the next one)."""
        if not comm.distributed:
            return self.raised
        previous = self._read_vote()
        flag = comm.all_reduce(comm.flag(self.raised), "max")
        if flag.device.type == "cuda":
            self._vote = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            self._vote.copy_(flag, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._vote = flag
        return previous

    def _read_vote(self) -> bool:
        if self._vote is None:
            return False
        if self._ready is not None:
            self._ready.synchronize()
        return bool(self._vote[0] > 0)


def fit(
    cfg: Config,
    train: TrainingData,
    val: EvalData | None = None,
    *,
    resume: bool = False,
    accelerator=None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train the head per `cfg`, checkpointing as it goes; returns final metrics (if `val`).

    Everything a run could be refused for (config values, data, the output folder, the
    checkpoint to resume from) is checked before the first step and before any file is written.
    """
    cfg.validate()
    output = check_output_dir(cfg.train.output, "train.output")
    ckpt_dir = output / "checkpoints"
    if not resume:
        _refuse_earlier_run(output, ckpt_dir)
    validate(train, val)
    check_trackers(cfg.train.log_with)
    accelerator = accelerator or make_accelerator(
        cfg.train.precision,
        cfg.train.dist_timeout_minutes,
        cfg.train.log_with,
        str(output / "tracking"),
    )
    device = accelerator.device
    comm = ClassGroup(device=device)
    is_main = comm.rank == 0
    # rank 0 only: under DeepSpeed on the CPU, Accelerate takes every rank for the main one
    tracking = is_main and bool(getattr(accelerator, "log_with", None))

    head = build_head(cfg, train, comm, device)
    criterion = build_loss(cfg.loss.name, train.counts, **_loss_options(cfg)).to(device)
    num_samples = len(train.labels)
    batch = cfg.optim.batch_size
    steps_per_epoch = math.ceil(num_samples / batch)
    total_steps = cfg.optim.epochs * steps_per_epoch
    step, momentum = 0, {}
    if resume:
        checkpoint = _resume_point(ckpt_dir, comm)
        if checkpoint is not None:
            prov.check_same(
                checkpoint.trainer_state.get("provenance") or {},
                train.provenance,
                f"checkpoint {checkpoint.path}",
                f"training store {train.source}",
                fix="resume with the data.train the run was started with, or start a new run "
                "in another train.output",
            )
            ckpt.load_checkpoint(checkpoint, head)
            step, momentum = checkpoint.step, checkpoint.momentum
            if is_main:
                print(f"resumed from {checkpoint.path} at step {step}", flush=True)
    optimizer, autocast = build_optimizer(head, cfg, accelerator)  # after loading: DeepSpeed copies
    optimizer.load_momentum(momentum)
    if is_main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _write_atomically(output / "config.json", json.dumps(cfg.to_dict(), indent=2))
            _keep_log_until(output / "metrics.jsonl", step)
        except OSError as err:
            raise UserInputError(
                f"train.output {output}: cannot write ({err}); choose a writable folder"
            ) from None

    if tracking:
        accelerator.init_trackers(PROJECT, config=hyperparameters(cfg.to_dict()))
    select = cfg.train.select_on
    if select and (val is None or not cfg.train.eval_every_epoch):
        raise UserInputError(
            f"train.select_on={select}: selecting the best epoch needs a validation store "
            "(data.val) and train.eval_every_epoch=true"
        )
    best = _best_so_far(output / "best", select) if select else None
    stop = _StopFlag(announce=is_main)
    log = open(output / "metrics.jsonl", "a") if is_main else None  # noqa: SIM115
    progress = tqdm(total=total_steps, initial=step, disable=not is_main, desc="train")
    last_step = total_steps if max_steps is None else min(total_steps, step + max_steps)
    started = time.perf_counter()
    last_log = (step, started)
    try:
        while step < last_step:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = epoch_indices(cfg.train.sampler, cfg.train.seed, epoch, train.labels)
            view_ids = _epoch_views(cfg.train.seed, epoch, num_samples, train.num_views)
            indices = order[in_epoch * batch : (in_epoch + 1) * batch]
            shares = Partition(len(indices), comm.world_size)
            lo, hi = shares.range(comm.rank)
            local = indices[lo:hi]
            views = None if view_ids is None else view_ids[local]
            features = training_inputs(head, train, local, views).to(device)
            labels = torch.as_tensor(train.labels[local], dtype=torch.long, device=device)

            lr = learning_rate(cfg.optim, step, steps_per_epoch)
            optimizer.set_lr(lr)
            classes = None
            if cfg.train.class_sample_fraction > 0:
                classes = sample_classes(
                    cfg.train.seed,
                    step,
                    train.labels[indices],
                    cfg.train.class_sample_fraction,
                    train.num_classes,
                    (head.class_start, head.class_stop),
                ).to(device)
            # attention dropout: one seed on every rank (masks are keyed by global token ids)
            torch.manual_seed(cfg.train.seed * 1_000_003 + step * 101)
            loss, parts = train_step(
                head, optimizer, autocast, criterion, features, labels, classes, shares.sizes
            )
            step += 1
            progress.update(1)
            epoch_end = step % steps_per_epoch == 0
            save = step % cfg.train.checkpoint_every == 0 or epoch_end or step == last_step
            if save or step % cfg.train.log_every == 0:  # where the step syncs with the host anyway
                _check_finite(loss, step, epoch, cfg.optim.lr, ckpt_dir)

            if log is not None and (step % cfg.train.log_every == 0 or step == last_step):
                record = {"step": step, "epoch": epoch, "lr": lr, "loss": float(loss.detach())}
                record.update({k: float(v) for k, v in parts.items()})
                now = time.perf_counter()
                record["elapsed_s"] = round(now - started, 3)
                log.write(json.dumps(record) + "\n")
                log.flush()
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                if tracking:
                    rate = (step - last_log[0]) / max(now - last_log[1], 1e-9)
                    scalars = {f"train/{k}": record[k] for k in ("loss", "lr", *parts)}
                    scalars.update({"train/steps_per_s": rate, "train/samples_per_s": rate * batch})
                    accelerator.log(scalars, step=step)
                last_log = (step, now)
            saved = None
            if save:
                saved = _save(ckpt_dir, head, optimizer, step, epoch, cfg, train)
            if stop.agreed(comm):
                saved = saved or _save(ckpt_dir, head, optimizer, step, epoch, cfg, train)
                raise Preempted(
                    f"stopped by {stop.signal_name or 'a signal to another rank'} at step "
                    f"{step} (checkpoint {saved}); resume with --resume"
                )
            if val is not None and cfg.train.eval_every_epoch and epoch_end:
                # every rank: evaluation's collectives pair up only if all ranks run it
                metrics = evaluate(head, val, train, cfg.train.eval_batch_size, device)
                if log is not None:
                    log.write(json.dumps({"step": step, "epoch": epoch, "eval": metrics}) + "\n")
                    log.flush()
                if tracking:
                    accelerator.log(eval_scalars(metrics), step=step)
                value = metrics.get(select) if select else None
                if value is not None and (best is None or value > best):
                    # every rank sees the same metrics, so all take this collective together
                    best = value
                    selected = {"metric": select, "value": value, "step": step, "epoch": epoch}
                    _publish(cfg, head, train, output / "best", device, selected)
        results: dict[str, Any] = {"steps": step, "total_steps": total_steps, "rank": comm.rank}
        if step >= total_steps:
            results.update(_finish(cfg, head, train, val, output, device))
            results["final"] = str(output / "final")
            if tracking and "eval" in results:
                accelerator.log(eval_scalars(results["eval"]), step=step)
    finally:
        stop.release_interrupt()
        progress.close()
        if log is not None:
            log.close()
        if tracking:  # not accelerator.end_training(): it destroys the process group
            for tracker in accelerator.trackers:
                tracker.finish()
    return results


def _check_finite(loss: torch.Tensor, step: int, epoch: int, lr: float, ckpt_dir: Path) -> None:
    """Stop a diverged run before it checkpoints or exports non-finite values (every rank sees
    the same loss, so all stop at the same step)."""
    value = float(loss.detach())
    if math.isfinite(value):
        return
    kept = ckpt.step_dirs(ckpt_dir)
    where = f"the checkpoints up to {kept[-1][1].name} are kept" if kept else "no checkpoint"
    raise UserInputError(
        f"the training loss is {value} at step {step} (epoch {epoch}): training diverged; "
        f"lower optim.lr (it is {lr:g}) and start again ({where})"
    )


def _refuse_earlier_run(output: Path, ckpt_dir: Path) -> None:
    """A fresh run must not write over another run's checkpoints (their pruning and `latest`
    would mix the two runs) or leave its final/ beside them."""
    earlier = [p for p in (ckpt_dir / "latest", output / "final") if p.exists()]
    earlier += [path for _, path in ckpt.step_dirs(ckpt_dir)[-1:]]
    if earlier:
        raise UserInputError(
            f"train.output {output} already holds a training run ({earlier[0]}): pass --resume "
            "to continue it, or choose another train.output (or delete that folder) to start "
            "over"
        )


def _resume_point(ckpt_dir: Path, comm: ClassGroup) -> ckpt.Checkpoint | None:
    """The checkpoint every rank resumes from: rank 0 verifies and chooses (telling the user
    what it skipped), the others load its choice. None: nothing to resume, a fresh start."""
    found, problem = None, None
    if comm.rank == 0:
        try:
            found = ckpt.find_resumable(ckpt_dir, _say)
        except UserInputError as err:
            problem = err
        if found is None and problem is None:
            _say(f"--resume: no checkpoint in {ckpt_dir} yet; starting from step 0")
    mine = -2 if problem else (found.step if found else -1)
    vote = torch.tensor([mine if comm.rank == 0 else -3], dtype=torch.int64, device=comm.device)
    chosen = int(comm.all_reduce(vote, "max")[0])
    if problem is not None:
        raise problem
    if chosen == -2:
        raise UserInputError(f"--resume: rank 0 found no usable checkpoint in {ckpt_dir}")
    if chosen == -1 or found is not None:
        return found
    try:
        return ckpt.read_checkpoint(ckpt_dir / f"step_{chosen:09d}")
    except ckpt.DamagedCheckpoint as err:
        raise UserInputError(
            f"--resume: step_{chosen:09d} in {ckpt_dir} reads differently on rank {comm.rank} "
            f"than on rank 0 ({err}): check the shared file system"
        ) from None


def _say(message: str) -> None:
    print(f"candle-dist train: {message}", file=sys.stderr, flush=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _keep_log_until(path: Path, step: int) -> None:
    """Drop the metrics.jsonl records past `step` (atomically): a resumed run writes them
    again, and a record cut short by a kill is no record."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    _write_atomically(path, "".join(kept))


def train_step(
    head: CandleHead,
    optimizer: HeadSGD,
    autocast: Callable[[], AbstractContextManager],
    criterion,
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor | None,
    image_sizes: list[int],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step on this rank's share of the global batch (every rank's count in `image_sizes`):
    loss under the run's autocast, backward, replicated gradients summed, parameters updated."""
    head.train()
    with autocast():
        loss, parts = head.loss(features, labels, criterion, classes, image_sizes)
    optimizer.backward_and_step(loss)
    return loss, parts


def _save(
    ckpt_dir: Path, head, optimizer: HeadSGD, step: int, epoch: int, cfg: Config, train
) -> Path:
    state = {"step": step, "epoch": epoch, "world_size": head.comm.world_size}
    state["config"] = cfg.to_dict()
    state["provenance"] = train.provenance
    return ckpt.save_checkpoint(ckpt_dir, head, optimizer.momentum(), state)


def _loss_options(cfg: Config) -> dict[str, float]:
    """The loss section's values of the options the configured loss has."""
    return {name: getattr(cfg.loss, name) for name in loss_options(cfg.loss.name)}


def sample_classes(
    seed: int,
    step: int,
    batch_labels: np.ndarray,
    fraction: float,
    num_classes: int,
    class_range: tuple[int, int],
) -> torch.Tensor:
    """Sampled mode's classes of this step within `class_range`: the batch's classes plus a
    Bernoulli(`fraction`) draw of the rest. The draw covers all classes with a seed shared by
    every rank, so the union over ranks does not depend on the rank count."""
    if not 0.0 < fraction <= 1.0:
        raise UserInputError(
            f"train.class_sample_fraction={fraction} must be in (0, 1] (0 disables sampling)"
        )
    keep = np.random.default_rng([seed, step, 2]).random(num_classes) < fraction
    keep[batch_labels] = True
    start, stop = class_range
    return torch.as_tensor(np.flatnonzero(keep[start:stop]) + start, dtype=torch.long)


def _epoch_views(seed: int, epoch: int, num_samples: int, num_views: int) -> np.ndarray | None:
    if num_views <= 0:
        return None
    return np.random.default_rng([seed, epoch, 1]).integers(0, num_views, num_samples)


@torch.no_grad()
def predict_scores(
    head: CandleHead | ProbeHead, inputs: torch.Tensor, image_sizes: list[int] | None = None
) -> torch.Tensor:
    """Scores [all ranks' images, all classes] (columns gathered; float32): the Candle head's
    test-phase `logits_vt + logits_vv`, a probe head's classifier scores. `inputs` are what the
    head reads (`head.input_kind`); `image_sizes` as in `CandleHead.forward`."""
    head.eval()
    scores = head.scores(inputs, image_sizes).float()
    if head.comm.distributed:
        sizes = head.class_partition.sizes
        scores = head.comm.gather_constant(scores.t().contiguous(), sizes).t()
    return scores


def training_inputs(
    head: CandleHead | ProbeHead, train: TrainingData, indices: np.ndarray, views=None
) -> torch.Tensor:
    """What `head` reads for these training samples: pooled features (one augmented view each
    if `views`) or token features."""
    if head.input_kind == "tokens":
        return train.token_rows(indices)
    return train.rows(indices, views)


def eval_inputs(head: CandleHead | ProbeHead, val: EvalData, start: int, stop: int) -> torch.Tensor:
    """What `head` reads for evaluation samples start..stop."""
    source = require_tokens(val.tokens, val.source) if head.input_kind == "tokens" else val.features
    return torch.as_tensor(np.asarray(source[start:stop], dtype=np.float32))


@torch.no_grad()
def evaluate(
    head: CandleHead, val: EvalData, train: TrainingData, batch_size: int, device
) -> dict[str, Any]:
    """Metrics (docs/method.md, "Metrics") on `val`, in batches (each rank scores its share of a
    batch)."""
    acc = MetricAccumulator(train.counts, train.num_base_classes)
    comm = head.comm
    total = len(val.labels)
    for start in tqdm(range(0, total, batch_size), desc="eval", disable=comm.rank != 0):
        stop = min(start + batch_size, total)
        shares = Partition(stop - start, comm.world_size)
        lo, hi = shares.range(comm.rank)
        rows = eval_inputs(head, val, start + lo, start + hi)
        scores = predict_scores(head, rows.to(device), shares.sizes)
        acc.update(scores.cpu(), val.labels[start:stop])
    return acc.compute()


def _publish(cfg, head, train, folder: Path, device, selected: dict | None = None) -> None:
    """head.pt, head_meta.json and classifier.pt of the head as it is now, in `folder` (final/
    or best/; collective). The folder is filled under a temporary name and renamed when complete:
    it never looks finished when it is not."""
    full = head.full_state_dict()
    if head.comm.rank != 0:
        return
    with staged_dir(folder, replace=True) as staging:
        torch.save(full, staging / "head.pt")
        if isinstance(head, ProbeHead):
            options = head.options()
        else:
            options = candle_options(cfg, math.log(head.scale))
        meta = {
            "head_type": head.head_type,
            "classnames": train.classnames,
            "num_base_classes": train.num_base_classes,
            "counts": [int(c) for c in train.counts],
            "head_options": options,
            "clip": train.clip,
            "train_source": train.source,
            "provenance": train.provenance,
        }
        if cfg.stage2.source:
            meta["stage2"] = {"from": cfg.stage2.source, "method": cfg.stage2.method}
        if selected is not None:
            meta["selected"] = selected
        (staging / "head_meta.json").write_text(json.dumps(meta))
        if isinstance(head, ProbeHead):
            return  # the exported classifier (classifier.pt) is the Candle head's formula
        # on the accelerator: on the CPU this takes longer than NCCL's default timeout at
        # 10^5 classes, while the other ranks wait in the next collective
        single = CandleHead.from_state_dict(full, device=device, **options)
        export_classifier(single, staging / "classifier.pt", train.classnames, train.provenance)
        del single


def _best_so_far(folder: Path, metric: str) -> float | None:
    """The value best/ was selected with (a resumed run continues the selection)."""
    try:
        selected = json.loads((folder / "head_meta.json").read_text()).get("selected") or {}
    except (OSError, ValueError):
        return None
    return selected.get("value") if selected.get("metric") == metric else None


def _finish(cfg, head, train, val, output: Path, device) -> dict[str, Any]:
    """Final export (final/) and evaluation."""
    results: dict[str, Any] = {}
    _publish(cfg, head, train, output / "final", device)
    if val is not None:
        metrics = evaluate(head, val, train, cfg.train.eval_batch_size, device)
        results["eval"] = metrics
        if head.comm.rank == 0:
            to_json(metrics, output / "eval.json")
    return results
