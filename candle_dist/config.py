"""Run configuration: typed sections loaded from YAML, validated, with dotted `key=value` overrides.

    cfg = load_config("configs/inat2018.yaml", ["optim.lr=1e-3", "head.mask=in_visual"])

An unknown key is an error that lists the valid keys of its section; a value a run could not
use (a negative learning rate, zero epochs, an unknown loss) is an error naming the key, before
any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from candle_dist.errors import UserInputError


@dataclass
class DataConfig:
    """Where features (and, for the extraction stage, shards) live."""

    train: str = ""  # feature store directory of the training split
    val: str | None = None  # feature store directory of the evaluation split
    train_shards: str | None = None  # brace-expanded shard URLs, for `extract`
    val_shards: str | None = None
    classnames: str | None = None  # classnames.txt; default: beside the shards


@dataclass
class ClipConfig:
    """The frozen CLIP used for extraction (open_clip names)."""

    name: str = "ViT-B-16"
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "none"
    model_config: str | None = None
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    class_info: str | None = None  # TSV of per-class fields for {field} in templates
    batch_size: int = 256
    workers: int = 8
    views: int = 0  # augmented views per training image (0 = none)
    precision: str = "auto"  # extraction autocast: auto, bf16, fp32 (README "GPUs and precision")


@dataclass
class HeadConfig:
    """The head: Candle (docs/method.md) or a baseline of docs/baselines.md."""

    # candle (prototypes + fusion over pooled features), decoder (transformer blocks over the
    # store's token features, `extract --tokens`) or linear (a probe on pooled features)
    type: str = "candle"
    # decoder/linear: the classifier starts from the class text features (zero-shot) or random
    init: str = "text"
    depth: int = 3  # decoder: pre-norm transformer blocks
    decoder_heads: int = 4  # decoder: attention heads per block
    mlp_ratio: float = 0.5  # decoder: MLP hidden width / token width
    mask: str = "none"
    virtual_init: str = "text"
    tie_virtual_to_text: bool = True
    visual_scale: float = 1.0
    num_heads: int = 8
    attn_dropout: float = 0.1
    chunk_rows: int = 1024
    logit_scale: float | None = None  # default: the store's CLIP logit scale, else log(100)


@dataclass
class LossConfig:
    """The loss and its options; each loss reads the options it has (candle_dist.model.losses
    lists them per loss)."""

    # cla, cross_entropy, logit_adjusted, balanced_softmax, focal, class_balanced, ldam, lade, grw
    name: str = "cla"
    tau: float = 1.0  # logit-adjustment weight (cla, logit_adjusted)
    gamma: float = 2.0  # focal exponent
    beta: float = 0.9999  # class_balanced
    count_offset: float = 0.0  # added to every count first (1 keeps classes without images)
    max_margin: float = 0.5  # ldam: the largest class margin
    margin_scale: float = 30.0  # ldam: margins are scaled by this (the logit scale)
    remine_lambda: float = 0.1  # lade: regularizer of the MINE estimate
    estim_loss_weight: float = 0.1  # lade: weight of the estimate in the loss
    exp_scale: float = 1.0  # grw: class weights are prior^(-exp_scale)


@dataclass
class OptimConfig:
    """The reference recipe: SGD, one constant warm-up epoch, cosine decay."""

    lr: float = 3e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 50
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 128  # global batch (all ranks together)


@dataclass
class TrainConfig:
    output: str = "runs/candle"
    seed: int = 0
    # several seeds, each in OUTPUT/seed-<s>, with mean ± std in OUTPUT/seeds.json; [] = one run
    # with train.seed (candle_dist/train/seeds.py)
    seeds: list[int] = field(default_factory=list)
    checkpoint_every: int = 500  # steps; also at every epoch end
    log_every: int = 20
    eval_batch_size: int = 1024
    eval_every_epoch: bool = False  # evaluate after every epoch (else only at the end)
    # keep the epoch with the best value of this eval metric (top1, hm, few, balanced_accuracy,
    # macro_f1, ...) in OUTPUT/best as well as the last one in OUTPUT/final; "" = off
    select_on: str = ""
    # experiment trackers through Accelerate: tensorboard, wandb, mlflow, aim; [] for none
    # (candle_dist/train/tracking.py; TensorBoard's event files go to OUTPUT/tracking)
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    # how an epoch draws samples: uniform (each once), square_root or class_balanced (classes
    # drawn in proportion to n_c^0.5 or equally; candle_dist/train/sampler.py)
    sampler: str = "uniform"
    # auto (bf16 autocast on GPUs with native bf16, else fp32), bf16, fp32: README "GPUs and
    # precision"
    precision: str = "auto"
    # how long a rank waits in a collective before the process group gives up (NCCL's default
    # is 10 minutes; rank 0 exporting a 10^5-class classifier can take longer)
    dist_timeout_minutes: float = 60.0
    # Sampled mode (10^5-10^6 classes): per step, the batch's classes plus this fraction of the
    # others serve as prototype rows, attention tokens and logit columns. 0 = exact objective.
    class_sample_fraction: float = 0.0
    num_workers: int = 0


@dataclass
class Stage2Config:
    """Second-stage training of a decoder/linear run's classifier (docs/baselines.md)."""

    # the trained run to start from (its final/ or best/ folder); "" = no second stage
    source: str = field(default="", metadata={"key": "from"})
    # crt (re-train the classifier), lws (a learned scale per class), disalign (gated per-class
    # scale and bias), marc (per-class a_c z_c + b_c ||w_c||); the representation stays frozen
    method: str = "crt"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict[str, Any]:
        """Sections by their YAML keys (`stage2.from`), as `load_config` reads them."""
        return {
            section.name: {
                _key(f): copy.deepcopy(getattr(getattr(self, section.name), f.name))
                for f in dataclasses.fields(getattr(self, section.name))
            }
            for section in dataclasses.fields(self)
        }

    def validate(self) -> None:
        """A UserInputError naming the first value a run could not use meaningfully.

        Such values otherwise fail deep inside a run (a zero checkpoint interval divides by
        zero, a negative seed fails numpy) or, worse, finish with a result that means nothing
        (zero epochs export an untrained head, a negative learning rate ascends the loss).
        """
        for section in dataclasses.fields(self):
            for name, value in dataclasses.asdict(getattr(self, section.name)).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserInputError(f"{section.name}.{name}={value!r} must be a finite number")
        for key, value, choices in _choices(self):
            if value not in choices:
                names = ", ".join(choice or '""' for choice in choices)
                raise UserInputError(f"unknown {key}={value!r}: choose one of {names}")
        for key, value, ok, requirement in _ranges(self):
            if not ok:
                raise UserInputError(f"{key}={value!r} {requirement}")


def load_config(
    path: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    *,
    source: str | None = None,
) -> Config:
    """Config from a YAML file (or already-read sections, or defaults), then `section.key=value`
    overrides applied. Errors name `source` (default: the file, or "defaults")."""
    raw: dict[str, Any] = {}
    if isinstance(path, dict):
        raw = copy.deepcopy(path)
        source = source or "config"
    elif path is not None:
        source = source or str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UserInputError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise UserInputError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise UserInputError(f"config file {path} must hold a mapping of sections")
    source = source or "defaults"
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value) if value != "" else ""
    cfg = _build(Config, raw, source, "")
    cfg.validate()
    return cfg


# eval metrics where larger is better, that train.select_on may name
SELECTABLE = (
    "top1", "top5", "base", "new", "hm", "many", "medium", "few",
    "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
)  # fmt: skip


def _choices(cfg: Config) -> list[tuple[str, str, tuple[str, ...]]]:
    """(key, value, valid values) of every option that names one of a fixed set."""
    from candle_dist.model.fusion import MASK_MODES
    from candle_dist.model.head import VIRTUAL_INITS
    from candle_dist.model.heads import CLASSIFIER_INITS, HEAD_TYPES, STAGE2_METHODS
    from candle_dist.model.losses import LOSSES
    from candle_dist.precision import PRECISIONS
    from candle_dist.train.sampler import SAMPLERS

    return [
        ("clip.precision", cfg.clip.precision, PRECISIONS),
        ("head.type", cfg.head.type, HEAD_TYPES),
        ("head.init", cfg.head.init, CLASSIFIER_INITS),
        ("head.mask", cfg.head.mask, MASK_MODES),
        ("head.virtual_init", cfg.head.virtual_init, VIRTUAL_INITS),
        ("loss.name", cfg.loss.name, tuple(LOSSES)),
        ("train.precision", cfg.train.precision, PRECISIONS),
        ("train.sampler", cfg.train.sampler, tuple(SAMPLERS)),
        ("train.select_on", cfg.train.select_on, ("", *SELECTABLE)),
        ("stage2.method", cfg.stage2.method, STAGE2_METHODS),
    ]


def _ranges(cfg: Config) -> list[tuple[str, Any, bool, str]]:
    """(key, value, whether it is usable, what it must be and why) of every numeric option."""
    c, h, loss, o, t = cfg.clip, cfg.head, cfg.loss, cfg.optim, cfg.train
    at_least_one = "must be at least 1"
    return [
        ("clip.batch_size", c.batch_size, c.batch_size >= 1, at_least_one),
        ("clip.workers", c.workers, c.workers >= 0, "must be 0 (load in the main process) or more"),
        ("clip.views", c.views, c.views >= 0, "must be 0 (no augmented views) or more"),
        ("head.visual_scale", h.visual_scale, h.visual_scale >= 0, "must be 0 or more"),
        ("head.num_heads", h.num_heads, h.num_heads >= 1, at_least_one),
        ("head.depth", h.depth, h.depth >= 0, "must be 0 (the tokens' first one as is) or more"),
        ("head.decoder_heads", h.decoder_heads, h.decoder_heads >= 1, at_least_one),
        ("head.mlp_ratio", h.mlp_ratio, h.mlp_ratio > 0, "must be positive (e.g. 0.5)"),
        ("head.attn_dropout", h.attn_dropout, 0 <= h.attn_dropout < 1, "must be in [0, 1)"),
        ("head.chunk_rows", h.chunk_rows, h.chunk_rows >= 1, at_least_one),
        ("loss.tau", loss.tau, loss.tau >= 0, "must be 0 or more (the logit adjustment's weight)"),
        ("loss.gamma", loss.gamma, loss.gamma >= 0, "must be 0 or more (focal loss exponent)"),
        ("loss.beta", loss.beta, 0 <= loss.beta < 1, "must be in [0, 1) (e.g. 0.9999)"),
        ("loss.count_offset", loss.count_offset, loss.count_offset >= 0, "must be 0 or more"),
        ("loss.max_margin", loss.max_margin, loss.max_margin > 0, "must be positive (e.g. 0.5)"),
        ("loss.margin_scale", loss.margin_scale, loss.margin_scale >= 0, "must be 0 or more"),
        ("loss.remine_lambda", loss.remine_lambda, loss.remine_lambda >= 0, "must be 0 or more"),
        (
            "loss.estim_loss_weight",
            loss.estim_loss_weight,
            loss.estim_loss_weight >= 0,
            "must be 0 or more",
        ),
        ("loss.exp_scale", loss.exp_scale, loss.exp_scale >= 0, "must be 0 or more"),
        ("optim.lr", o.lr, o.lr > 0, "must be positive (the reference recipe uses 3e-4)"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "must be in [0, 1) (e.g. 0.9)"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be 0 or more"),
        (
            "optim.epochs",
            o.epochs,
            o.epochs >= 1,
            "must be at least 1: a run without an epoch would export an untrained head",
        ),
        ("optim.warmup_epochs", o.warmup_epochs, o.warmup_epochs >= 0, "must be 0 or more"),
        ("optim.warmup_lr", o.warmup_lr, o.warmup_lr >= 0, "must be 0 or more"),
        ("optim.batch_size", o.batch_size, o.batch_size >= 1, at_least_one),
        ("train.output", t.output, t.output.strip() != "", "must name the run's output folder"),
        ("train.seed", t.seed, t.seed >= 0, "must be 0 or more"),
        ("train.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 1, at_least_one),
        ("train.log_every", t.log_every, t.log_every >= 1, at_least_one),
        ("train.eval_batch_size", t.eval_batch_size, t.eval_batch_size >= 1, at_least_one),
        (
            "train.dist_timeout_minutes",
            t.dist_timeout_minutes,
            t.dist_timeout_minutes > 0,
            "must be positive (minutes a rank waits in a collective; NCCL's default is 10)",
        ),
        (
            "train.class_sample_fraction",
            t.class_sample_fraction,
            0 <= t.class_sample_fraction <= 1,
            "must be in [0, 1] (0 disables sampling)",
        ),
        ("train.num_workers", t.num_workers, t.num_workers >= 0, "must be 0 or more"),
    ]


def _key(f: dataclasses.Field) -> str:
    """A field's config key: its name, or `metadata["key"]` where the key is a Python keyword."""
    return f.metadata.get("key", f.name)


def _build(cls: type, raw: dict[str, Any], source: str, where: str):
    if not isinstance(raw, dict):
        raise UserInputError(f"{source}: {where or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    keys = {_key(f): f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        place = f"section '{where}'" if where else "top level"
        raise UserInputError(
            f"{source}: unknown key(s) {', '.join(unknown)} in {place}; valid keys: "
            f"{', '.join(keys)}"
        )
    values = {}
    for key_name, name in keys.items():
        if key_name not in raw:
            continue
        key = f"{where}.{key_name}" if where else key_name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[key_name], source, key)
        else:
            values[name] = _coerce(raw[key_name], hint, source, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], source, key) for v in items]
    if hint is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, int | float | bool):
        return str(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserInputError(f"{source}: {key} = {value!r} should be of type {hint.__name__}")
