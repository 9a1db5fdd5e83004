#!/usr/bin/env bash
# Extract CLIP features on every GPU of the job, then train the Candle head across all of them.
#
#   sbatch slurm/train_inat.sh                                  # configs/inat2018.yaml, 2 nodes
#   CONFIG=configs/inat2021.yaml sbatch --nodes=4 slurm/train_inat.sh optim.lr=5e-4
#   slurm/train_inat.sh --dry-run                               # print the commands, run nothing
#
# Submit from the repository root: the job runs there (config, launch/ and data paths are
# relative to it; REPO=DIR overrides). Arguments after the options are `section.key=value`
# config overrides, passed to extraction and training alike.
#
# Stages (STAGES, default "extract,train"):
#   extract  one srun task per GPU on every node runs `candle-dist extract` for the train and
#            val splits; rerunning resumes (finished shards are kept), a complete store is skipped
#   train    one `accelerate launch` per node (srun --ntasks-per-node=1), run as
#            `$PYTHON -m accelerate.commands.launch` (PYTHON's accelerate, not PATH's `accelerate`):
#            --num_machines from SLURM_NNODES, --machine_rank from SLURM_NODEID, --num_processes =
#            nodes x GPUs per node, main address = first host of SLURM_JOB_NODELIST and port
#            MAIN_PORT; always --resume
#
# Preemption and time limit: SLURM sends SIGUSR1 120 s before the end (--signal=B:USR1@120).
# The script forwards it to the running step; the trainer writes a checkpoint at the next step
# boundary and exits with 75, and the script requeues the job (scontrol requeue), which resumes
# from that checkpoint. torch >= 2.9 passes SIGUSR1 from torchrun to the trainer processes;
# with older torch they still get it where SLURM signals every process of the step; a step that
# has not stopped SHUTDOWN_TIMEOUT s after the signal is requeued as it is, and the job resumes
# from the last periodic checkpoint (train.checkpoint_every).
#
# Environment overrides: CONFIG, OVERRIDES (space-separated section.key=value), STAGES,
# GPUS_PER_NODE, CPUS_PER_NODE, MAIN_ADDR, MAIN_PORT (default 15000 + SLURM_JOB_ID % 15000, in
# 15000-29999: below Linux's ephemeral port range 32768-60999, from which any outgoing connection
# on the first node may already hold a port, and above the ports most services listen on),
# ACCELERATE_CONFIG (default launch/multi_node.yaml), PYTHON (default python: the interpreter
# of candle-dist and accelerate), SHUTDOWN_TIMEOUT (seconds the trainer gets to checkpoint
# after the signal, default 90), FORCE_EXTRACT=1 (run extraction even for a complete store).
#
#SBATCH --job-name=candle-inat
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

usage() { sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "$0"; }

DRY_RUN=0
args=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "train_inat.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) args+=("$arg") ;;
  esac
done

cd "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
CONFIG=${CONFIG:-configs/inat2018.yaml}
STAGES=${STAGES:-extract,train}
PYTHON=${PYTHON:-python}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/multi_node.yaml}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
read -ra overrides <<< "${OVERRIDES:-}"
overrides+=(${args[@]+"${args[@]}"})

# --- where we are: nodes, GPUs, ranks -----------------------------------------------------------

# "gpu-[01-03,07],login1" -> one host a line, as `scontrol show hostnames` prints them (used when
# scontrol is absent); zero padding is kept, several bracket groups in one name are expanded.
expand_nodelist() {
  local list=$1 current="" ch depth=0 i group
  local -a groups=()
  for ((i = 0; i < ${#list}; i++)); do
    ch=${list:i:1}
    if [[ $ch == "[" ]]; then depth=$((depth + 1)); fi
    if [[ $ch == "]" ]]; then depth=$((depth - 1)); fi
    if [[ $ch == "," && $depth == 0 ]]; then
      groups+=("$current")
      current=""
    else
      current+=$ch
    fi
  done
  groups+=("$current")
  local pattern='^([^[]*)\[([^]]*)\](.*)$'
  for group in "${groups[@]}"; do
    [[ -n $group ]] || continue
    if [[ $group =~ $pattern ]]; then
      local prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
      local range lo hi n
      local -a parts
      IFS=, read -ra parts <<< "$ranges"
      for range in "${parts[@]}"; do
        lo=${range%-*}
        hi=${range#*-}
        for ((n = 10#$lo; n <= 10#$hi; n++)); do
          expand_nodelist "$(printf '%s%0*d%s' "$prefix" "${#lo}" "$n" "$suffix")"
        done
      done
    else
      echo "$group"
    fi
  done
}

hostnames() {
  if command -v scontrol > /dev/null 2>&1; then
    scontrol show hostnames "$1"
  else
    expand_nodelist "$1"
  fi
}

gpus_on_node() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
    echo "${SLURM_GPUS_PER_NODE##*:}" # "a100:8" -> 8
  elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then
    local -a ids
    IFS=, read -ra ids <<< "$SLURM_JOB_GPUS"
    echo "${#ids[@]}"
  else
    echo 1
  fi
}

NODELIST=${SLURM_JOB_NODELIST:-$(hostname)}
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
NODEID=${SLURM_NODEID:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(gpus_on_node)}
CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
CPUS_PER_GPU=$((CPUS_PER_NODE / GPUS_PER_NODE > 0 ? CPUS_PER_NODE / GPUS_PER_NODE : 1))
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
mapfile -t HOSTS < <(hostnames "$NODELIST")
MAIN_ADDR=${MAIN_ADDR:-${HOSTS[0]}}
MAIN_PORT=${MAIN_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 15000))}
if ((${#HOSTS[@]} != NNODES)); then
  echo "train_inat.sh: SLURM_JOB_NODELIST=$NODELIST names ${#HOSTS[@]} host(s)," \
    "SLURM_NNODES=$NNODES" >&2
  exit 2
fi

# --- the config: the extraction settings come from the same YAML as training ----------------------

config_vars=$(
  "$PYTHON" - "$CONFIG" ${overrides[@]+"${overrides[@]}"} << 'PY'
import shlex
import sys

from candle_dist.config import load_config
from candle_dist.errors import UserInputError

try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except UserInputError as err:
    sys.exit(f"train_inat.sh: {err}")
values = {
    "TRAIN_SHARDS": cfg.data.train_shards,
    "VAL_SHARDS": cfg.data.val_shards,
    "TRAIN_STORE": cfg.data.train,
    "VAL_STORE": cfg.data.val,
    "CLASSNAMES": cfg.data.classnames,
    "CLASS_INFO": cfg.clip.class_info,
    "MODEL": cfg.clip.name,
    "PRETRAINED": cfg.clip.pretrained,
    "PRECISION": cfg.clip.precision,
    "MODEL_CONFIG": cfg.clip.model_config,
    "EXTRACT_BATCH": cfg.clip.batch_size,
    "WORKERS": cfg.clip.workers,
    "VIEWS": cfg.clip.views,
    "OUTPUT": cfg.train.output,
}
for key, value in values.items():
    print(f"{key}={shlex.quote('' if value is None else str(value))}")
print(f"TEMPLATES=({' '.join(shlex.quote(t) for t in cfg.clip.templates)})")
PY
) || exit 2
eval "$config_vars"

# --- running steps: printed always, run unless --dry-run; SIGUSR1 goes to the running step ------

quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

STEP_PID=""
PREEMPTED=0
STOP_DEADLINE=0
on_usr1() {
  PREEMPTED=1
  STOP_DEADLINE=$((SECONDS + SHUTDOWN_TIMEOUT + 15))
  echo "train_inat.sh: SIGUSR1 (time limit or preemption): stopping the step to requeue" >&2
  if [[ -n $STEP_PID ]]; then kill -USR1 "$STEP_PID" 2> /dev/null || true; fi
}
trap on_usr1 USR1

# Run a command in the background and poll it, so that the USR1 trap runs meanwhile; a step
# still running SHUTDOWN_TIMEOUT s after the signal is left to `scontrol requeue` (status 124).
step() {
  echo "+ $(quote "$@")"
  if ((DRY_RUN)); then return 0; fi
  "$@" &
  STEP_PID=$!
  while kill -0 "$STEP_PID" 2> /dev/null; do
    if ((PREEMPTED && SECONDS > STOP_DEADLINE)); then
      echo "train_inat.sh: the step did not stop within ${SHUTDOWN_TIMEOUT}s" >&2
      STEP_PID=""
      return 124
    fi
    sleep 1 &
    wait $! || true
  done
  local status=0
  wait "$STEP_PID" || status=$?
  STEP_PID=""
  return "$status"
}

finish() { # $1 = exit status of the last step
  local status=$1
  if ((status == 75 || (PREEMPTED && status != 0))); then
    echo "train_inat.sh: preempted (status $status); requeueing job ${SLURM_JOB_ID:-?}" >&2
    step scontrol requeue "${SLURM_JOB_ID:?requeue needs SLURM_JOB_ID}" || true
    exit 0
  fi
  exit "$status"
}

echo "# $NNODES node(s) x $GPUS_PER_NODE GPU(s) = $WORLD_SIZE rank(s); main address" \
  "$MAIN_ADDR:$MAIN_PORT; this is node $NODEID (${HOSTS[$NODEID]:-?}) of: ${HOSTS[*]}"
echo "# config $CONFIG${overrides[0]+ with ${overrides[*]}}; training output $OUTPUT"
if ((!DRY_RUN)) && ! command -v srun > /dev/null 2>&1; then
  echo "train_inat.sh: srun not found: submit with sbatch (or look with --dry-run)" >&2
  exit 2
fi

# --- stage 1: features, one srun task per GPU ----------------------------------------------------

extract_split() { # $1 split (train|eval)  $2 shards  $3 store
  local split=$1 shards=$2 store=$3
  if [[ -z $shards ]]; then
    echo "# no ${split} shards in the config (data.${split/eval/val}_shards): skipping" >&2
    return 0
  fi
  if [[ -f $store/manifest.json && -z ${FORCE_EXTRACT:-} ]]; then
    echo "# $store is complete (manifest.json): skipping its extraction"
    return 0
  fi
  local cmd=("$PYTHON" -m candle_dist.cli extract --shards "$shards" --output "$store"
    --model "$MODEL" --pretrained "$PRETRAINED" --precision "$PRECISION"
    --batch-size "$EXTRACT_BATCH" --workers "$WORKERS" --split "$split" --templates "${TEMPLATES[@]}")
  if [[ -n $MODEL_CONFIG ]]; then cmd+=(--model-config "$MODEL_CONFIG"); fi
  if [[ -n $CLASSNAMES ]]; then cmd+=(--classnames "$CLASSNAMES"); fi
  if [[ -n $CLASS_INFO ]]; then cmd+=(--class-info "$CLASS_INFO"); fi
  if [[ $split == train && $VIEWS != 0 ]]; then cmd+=(--views "$VIEWS"); fi
  step srun --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_GPU" --kill-on-bad-exit=1 "${cmd[@]}" || return $?
  if ((!DRY_RUN)) && [[ ! -f $store/manifest.json ]]; then
    echo "train_inat.sh: $store has no manifest.json after extraction; resubmit to resume" >&2
    return 1
  fi
}

if [[ ,$STAGES, == *,extract,* ]]; then
  status=0
  extract_split train "$TRAIN_SHARDS" "$TRAIN_STORE" || status=$?
  if ((status == 0)) && [[ -n $VAL_STORE ]]; then
    extract_split eval "$VAL_SHARDS" "$VAL_STORE" || status=$?
  fi
  if ((status != 0 || PREEMPTED)); then finish "$((status ? status : 1))"; fi
fi

# --- stage 2: training, one accelerate launch per node ---------------------------------------------

if [[ ,$STAGES, == *,train,* ]]; then
  # torchrun (under accelerate launch) forwards SIGUSR1 to the trainer and gives it
  # SHUTDOWN_TIMEOUT seconds to write its checkpoint before killing it.
  export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
  echo "+ export PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE" \
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
  launch=(--config_file "$ACCELERATE_CONFIG" --num_machines "$NNODES"
    --num_processes "$WORLD_SIZE" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
    -m candle_dist.cli train --config "$CONFIG" --resume ${overrides[@]+"${overrides[@]}"})
  echo "# node $NODEID runs: $(quote "$PYTHON" -m accelerate.commands.launch \
    --machine_rank "$NODEID" "${launch[@]}")"
  # on each node, with that node's SLURM_NODEID ($1 = PYTHON)
  on_node='trap "" USR1; python=$1; shift'
  on_node+='; exec "$python" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"'
  status=0
  step srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
    --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=1 \
    bash -c "$on_node" launch "$PYTHON" "${launch[@]}" || status=$?
  finish "$status"
fi
