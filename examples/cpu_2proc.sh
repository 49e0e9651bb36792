#!/bin/sh
# Data-parallel training in two CPU processes on one machine (DDP over gloo), with torchrun.
#   sh examples/cpu_2proc.sh --config run.yaml          # any `preftune train` flags
#   sh examples/cpu_2proc.sh --max_steps 6              # the built-in demo (each process takes
#                                                       # --per_device_train_batch_size pairs a step)
# Not `accelerate launch`: on a machine without GPUs its launcher starts ONE process (its
# multi-CPU mode goes through mpirun). The run records the processes it trained with as
# "world_size" in OUTPUT_DIR/run_config.json and logs "N processes" at start;
# tests/test_reliability.py runs this script and checks both.
# Environment: NPROC (default 2) processes, OMP_NUM_THREADS (default 1) threads each,
# PET_MASTER_PORT to run two jobs at once (torchrun's default port is 29500),
# PYTHON (default python) for the interpreter that has preftune installed.
set -eu
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "${NPROC:-2}" -m preftune train "$@"
