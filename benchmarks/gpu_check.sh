#!/usr/bin/env bash
# The GPU check: cuda tests, the head benchmark and extraction throughput on one CUDA device,
# unattended, in at most 8 minutes (about 3 to 4 expected on an H100/H200).
#
# Usage: bash benchmarks/gpu_check.sh [--help]
#
# Steps, each under its own time limit; a failed or killed step is recorded and the next runs:
#   machine  30 s   the card (name, capability, memory), driver, CUDA and torch versions;
#                   that the packages the steps need import
#   tests    170 s  pytest -m cuda tests/test_{cuda,bf16}.py: the head against the dense oracle in fp32
#                   and bf16, `candle-dist train` with a resume, extraction (tiny CLIP, ViT-B-16)
#   head     140 s  candle-dist bench head --dtype bf16 at C = 4,000 (B = 128) and C = 8,142
#                   (B = 256), ours and the dense reference (its OOM or slowness is a note)
#   extract  80 s   ViT-B-16 images/s, bf16: end-to-end extraction and the encoder alone
#   report   20 s   the JSON of every figure and the <!-- bench:gpu --> section of BENCHMARKS.md
# Without a CUDA device each step prints SKIPPED with the reason, the JSON says so and no
# markdown is written. Exit status 1 if any step failed, else 0.
#
# Environment:
#   GPU_CHECK_JSON      the figures (default benchmarks/gpu_check.json)
#   GPU_CHECK_MARKDOWN  file whose gpu section is rewritten (default BENCHMARKS.md)
#   GPU_CHECK_LOGS      full output of pytest and the benchmarks (default runs/gpu_check)
#   PYTHON              the interpreter (default python3)
#   GPU_CHECK_DEVICE    test mode only, for tests/test_gpu_check.py: "cpu" runs every step at
#                       tiny sizes on the CPU to check this script's code; its figures mean
#                       nothing, and markdown is written only where GPU_CHECK_MARKDOWN points.

set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
    exit 0
fi

# Paths given by the caller are relative to where it runs; the steps run from the repository.
JSON=$(realpath -m "${GPU_CHECK_JSON:-$(dirname "$0")/gpu_check.json}")
LOGS=$(realpath -m "${GPU_CHECK_LOGS:-$(dirname "$0")/../runs/gpu_check}")
MARKDOWN=()
if [[ -n "${GPU_CHECK_MARKDOWN:-}" ]]; then
    MARKDOWN=(--markdown "$(realpath -m "$GPU_CHECK_MARKDOWN")")
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ "$DEVICE" == cpu ]]; then
    export CUDA_VISIBLE_DEVICES=""
elif [[ "$DEVICE" != cuda ]]; then
    echo "GPU_CHECK_DEVICE=$DEVICE: use cuda (the default) or cpu (test mode)" >&2
    exit 2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$LOGS"
echo "gpu check on $DEVICE: $(date -u +%FT%TZ), logs in $LOGS"

step() {
    local name=$1 limit=$2 rc=0
    echo "== $name (limit $limit s)"
    timeout --kill-after=5 "$limit" "$PYTHON" benchmarks/gpu_check.py "$name" \
        --work "$WORK" --logs "$LOGS" --limit "$limit" --device "$DEVICE" || rc=$?
    echo "$rc $limit" >"$WORK/$name.rc"
    if ((rc == 124 || rc == 137)); then
        echo "!! $name killed at its limit of $limit s"
    elif ((rc != 0)); then
        echo "!! $name failed (exit code $rc)"
    fi
}

step machine 30
step tests 170
step head 140
step extract 80
rc=0
timeout --kill-after=5 20 "$PYTHON" benchmarks/gpu_check.py report \
    --work "$WORK" --device "$DEVICE" --json "$JSON" ${MARKDOWN[@]+"${MARKDOWN[@]}"} || rc=$?
echo "gpu check: ${SECONDS} s in all, exit code $rc"
exit "$rc"
