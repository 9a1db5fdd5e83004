#!/usr/bin/env bash
# Extract CLIP features only: one srun task per GPU on every node, train and val splits.
#
#   sbatch slurm/extract.sh                                   # configs/inat2018.yaml
#   CONFIG=configs/inat2021.yaml sbatch --nodes=8 slurm/extract.sh clip.views=2
#   slurm/extract.sh --dry-run                                # print the commands, run nothing
#
# The extraction stage of slurm/train_inat.sh (same options, environment overrides and
# requeue on SIGUSR1), for encoding on more or different nodes than training uses. Rerunning
# resumes: finished shards are kept. Submit from the repository root.
#
#SBATCH --job-name=candle-extract
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=06:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail
cd "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
STAGES=extract exec bash slurm/train_inat.sh "$@"
