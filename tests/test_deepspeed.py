"""DeepSpeed ZeRO-1/2 through `accelerate launch` ends where the one-process trainer ends.

One launch of launch/deepspeed_zero2.yaml (launch/zero2.json) with 2 gloo ranks runs this file as
a script on a small synthetic problem (attention dropout off), switching the ZeRO stage between
runs of the same Accelerator:
- ZeRO-2 to the end, and ZeRO-1 to the end;
- ZeRO-2 stopped after RESUME_AT steps, then resumed from its checkpoint under ZeRO-1 (momentum
  scattered into ZeRO's partitions);
- the decoder head under ZeRO-2 (its blocks are the replicated parameters), then an LWS second
  stage from it (only class-sharded parameters train: the plain optimizer under the launch).
The test process then trains the same problem with one plain process, and resumes the ZeRO-2
checkpoint there (momentum gathered from ZeRO's partitions). Heads, momentum and losses must
agree to 1e-5 relative. The launch gets a fresh TORCH_EXTENSIONS_DIR: the trainer must not make
DeepSpeed compile its shared-memory op (minutes on a fresh machine).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from candle_dist.config import load_config
from candle_dist.data.synthetic_features import make_synthetic_features
from candle_dist.errors import UserInputError
from candle_dist.train.cli import exit_if_distributed
from candle_dist.train.data import training_data_from_synthetic
from candle_dist.train.optimizer import configure_deepspeed
from candle_dist.train.trainer import fit, make_accelerator
from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parent.parent
C, C_BASE, D = 11, 7, 16
TOTAL_STEPS, RESUME_AT = 8, 3
OVERRIDES = [
    "head.attn_dropout=0.0",  # compared with a plain run: keep it about ZeRO, not dropout
    "head.num_heads=4",
    "head.chunk_rows=5",
    "head.mask=in_visual",
    "optim.batch_size=7",  # 23 samples: batches of 7, 7, 7, 2
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "optim.lr=0.1",
    "train.log_every=1",
]
DECODER = ["head.type=decoder", "head.depth=2"]
LAUNCHED = [  # (run, ZeRO stage, max_steps, resume, overrides of that run)
    ("zero2", 2, None, False, []),
    ("zero1", 1, None, False, []),
    ("zero2_part", 2, RESUME_AT, False, []),
    ("zero1_resumed", 1, None, True, []),
    ("decoder_zero2", 2, None, False, DECODER),
    (
        "lws_zero2",
        2,
        None,
        False,
        [*DECODER, "stage2.from=decoder_zero2/final", "stage2.method=lws"],
    ),
]


def _fit(output: Path, accelerator=None, overrides=(), **kwargs) -> None:
    train, _ = training_data_from_synthetic(
        make_synthetic_features(
            C, D, num_new=C - C_BASE, max_count=7, imbalance_ratio=7.0, val_per_class=1, seed=0
        )
    )
    tokens = torch.as_tensor(train.features)[:, None].repeat(1, 3, 1)
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
    train.tokens = (tokens + 0.1 * noise).numpy()
    root = output.parent
    overrides = [o.replace("from=", f"from={root}/") for o in overrides]
    cfg = load_config(None, [*OVERRIDES, f"train.output={output}", *overrides])
    fit(cfg, train, accelerator=accelerator, **kwargs)


def _launched(root: Path) -> None:
    """The body of every rank of the launch."""
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for run, stage, max_steps, resume, overrides in LAUNCHED:
        if resume and dist.get_rank() == 0:
            shutil.copytree(root / "zero2_part", root / run)
        dist.barrier()
        config["zero_optimization"]["stage"] = stage
        _fit(root / run, accelerator, overrides, max_steps=max_steps, resume=resume)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deepspeed")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(root / "torch_extensions"))
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", "launch/deepspeed_zero2.yaml", "--num_processes", "2"),
        *("--main_process_port", str(free_port())),
        *("-m", "tests.test_deepspeed", str(root)),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    print(f"accelerate launch (2 ranks, 4 runs): {time.perf_counter() - started:.1f} s")
    _fit(root / "plain")
    shutil.copytree(root / "zero2_part", root / "plain_resumed")
    _fit(root / "plain_resumed", resume=True)
    _fit(root / "decoder_plain", overrides=DECODER)
    lws = [*DECODER, "stage2.from=decoder_plain/final", "stage2.method=lws"]
    _fit(root / "lws_plain", overrides=lws)
    return {"root": root, "log": log}


def _close(mine: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    err = float((mine - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _losses(run: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(record["step"], record["loss"]) for record in records]


def _same_run(run: Path, ref: Path, tol: float = 1e-5) -> None:
    for mine_path, ref_path in [
        (run / "final" / "head.pt", ref / "final" / "head.pt"),
        (_latest(run) / "optimizer.pt", _latest(ref) / "optimizer.pt"),
    ]:
        mine = torch.load(mine_path, weights_only=True)
        want = torch.load(ref_path, weights_only=True)
        assert mine.keys() == want.keys(), mine_path
        for name, tensor in want.items():
            _close(mine[name], tensor, f"{run.name} {ref_path.name} {name}", tol)
    steps, losses = zip(*_losses(run), strict=True)
    ref_steps, ref_losses = zip(*_losses(ref), strict=True)
    assert steps == ref_steps == tuple(range(1, TOTAL_STEPS + 1))
    _close(torch.tensor(losses), torch.tensor(ref_losses), f"{run.name} losses", tol)


def test_launch_ran_zero_stages_without_compiling(runs):
    engines = [line for line in runs["log"].splitlines() if line.startswith("DeepSpeed ZeRO")]
    assert (
        engines
        == [  # none for LWS: no replicated parameter trains
            f"DeepSpeed ZeRO stage {stage} over 2 rank(s)" for run, stage, *_ in LAUNCHED[:-1]
        ]
    )
    assert not (runs["root"] / "torch_extensions").exists(), "DeepSpeed compiled an op"


@pytest.mark.parametrize("run", ["zero2", "zero1"])
def test_zero_equals_one_plain_process(runs, run):
    root = runs["root"]
    state = torch.load(root / "plain" / "final" / "head.pt", weights_only=True)
    assert (state["proj_image"] - torch.eye(D)).abs().max() > 1e-3  # it did train
    _same_run(root / run, root / "plain")


@pytest.mark.parametrize(
    ("run", "ref"), [("decoder_zero2", "decoder_plain"), ("lws_zero2", "lws_plain")]
)
def test_decoder_and_its_second_stage_under_zero_equal_one_plain_process(runs, run, ref):
    root = runs["root"]
    # 1e-4: the decoder's LayerNorm gradients are sums over more terms, reduced in ZeRO's order
    _same_run(root / run, root / ref, tol=1e-4)


def test_zero_checkpoint_resumes_under_zero_and_without_deepspeed(runs):
    root = runs["root"]
    part = _latest(root / "zero2_part")
    assert json.loads((part / "trainer.json").read_text())["step"] == RESUME_AT
    momentum = torch.load(part / "optimizer.pt", weights_only=True)
    assert momentum["proj_image"].shape == (D, D)  # gathered from both ranks' partitions
    assert momentum["virtual_prototypes"].shape == (C - C_BASE, D)
    _same_run(root / "zero1_resumed", root / "plain")
    _same_run(root / "plain_resumed", root / "plain")


def _accelerator(**config) -> SimpleNamespace:
    config.setdefault("zero_optimization", {"stage": 2})
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), mixed_precision="bf16")


def test_deepspeed_config_autos_are_filled_for_the_trainer():
    accelerator = _accelerator(
        train_micro_batch_size_per_gpu="auto",
        train_batch_size="auto",
        gradient_clipping="auto",
        bf16={"enabled": "auto"},
    )
    assert configure_deepspeed(accelerator, 128, 3) is True  # bf16 becomes autocast
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 43
    assert config["train_batch_size"] == 129
    assert config["gradient_clipping"] == 0.0
    assert config["gradient_accumulation_steps"] == 1
    assert config["bf16"] == {"enabled": False}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"zero_optimization": {"stage": 3}}, "stages 1 and 2"),
        ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
        ({"gradient_clipping": 1.0}, "gradient_clipping=1.0"),
        ({"gradient_accumulation_steps": 4}, "one unclipped step per batch"),
        ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ],
)
def test_deepspeed_config_that_changes_the_recipe_is_refused(config, message):
    with pytest.raises(UserInputError, match=message):
        configure_deepspeed(_accelerator(**config), 128, 2)


if __name__ == "__main__":
    _launched(Path(sys.argv[1]))
    exit_if_distributed(0)  # as `candle-dist train` ends a multi-process run
