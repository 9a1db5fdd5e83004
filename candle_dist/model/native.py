"""Build and load softmax_dropout.c, compiled once per machine with the system C compiler.

The shared object goes to <cache dir>/kernels/softmax_dropout-<key>.so; the key hashes the
source, the compiler's version and flags and the CPU's feature flags (it is built for the CPU it
runs on, so nodes of different types sharing a home directory keep separate builds). It links
OpenMP's libgomp, which resolves to the copy torch has already loaded: one thread pool for both.
Where no compiler works, or with CANDLE_DIST_NATIVE=0, `kernels()` is empty and the torch
implementation in softmax_dropout.py runs instead: same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from importlib import resources
from pathlib import Path

import torch

from candle_dist.cache import default_cache_dir

SOURCE = "softmax_dropout.c"
# Tried in order; the second serves compilers without -march=native or OpenMP's simd pragmas.
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-fno-math-errno", "-fopenmp"],
)
_PTR, _I64, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32


@functools.cache
def kernels() -> dict[torch.dtype, tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]]:
    """{dtype: (forward, backward)} for float32 and float64, or {} when unavailable."""
    if os.environ.get("CANDLE_DIST_NATIVE", "1") == "0":
        return {}
    library = _load()
    if library is None:
        return {}
    table = {}
    for dtype, suffix, real in (
        (torch.float32, "f32", ctypes.c_float),
        (torch.float64, "f64", ctypes.c_double),
    ):
        # (pointers..., heads, rows, keys, query_ids, key_offset, stride, seed, threshold,
        #  keep_scale, threads), as declared in softmax_dropout.c
        ids_and_keys = [_PTR, _I64, _I64, _U32, _U32, real, ctypes.c_int]
        forward = getattr(library, f"softmax_dropout_forward_{suffix}")
        forward.argtypes = [_PTR] * 3 + [_I64] * 3 + ids_and_keys
        forward.restype = None
        backward = getattr(library, f"softmax_dropout_backward_{suffix}")
        backward.argtypes = [_PTR] * 6 + [_I64] * 3 + ids_and_keys
        backward.restype = None
        table[dtype] = (forward, backward)
    return table


def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or platform.system() != "Linux":
        return None
    source = resources.files("candle_dist.model").joinpath(SOURCE).read_bytes()
    errors = []
    for flags in FLAG_SETS:
        name = f"softmax_dropout-{_key(compiler, flags, source)}.so"
        target = default_cache_dir() / "kernels" / name
        if not target.exists():
            error = _build(compiler, flags, source, target)
            if error:
                errors.append(error)
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(str(exc))
    warnings.warn(
        "candle_dist: could not build the native softmax-dropout kernel, using the slower torch "
        f"implementation (set CC to a working C compiler to fix): {errors[-1][-500:]}",
        stacklevel=3,
    )
    return None


def _key(compiler: str, flags: list[str], source: bytes) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(source)
    for part in (version, " ".join(flags), _cpu_flags(), platform.machine()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str, flags: list[str], source: bytes, target: Path) -> str | None:
    """Compile to a private temporary name, then rename: concurrent ranks never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_source = target.with_name(f".{target.stem}.{os.getpid()}.c")
    tmp_target = target.with_name(f".{target.stem}.{os.getpid()}.so")
    tmp_source.write_bytes(source)
    command = [compiler, *flags, "-fPIC", "-shared", "-o", str(tmp_target), str(tmp_source), "-lm"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return f"{' '.join(command)}: {result.stderr.strip()}"
        os.replace(tmp_target, target)
        return None
    finally:
        tmp_source.unlink(missing_ok=True)
        tmp_target.unlink(missing_ok=True)
