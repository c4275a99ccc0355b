#!/usr/bin/env bash
# One node, N GPUs: JAX drives every visible local GPU from one process, so the
# train command runs once, with the mesh laid over those GPUs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_node.sh [OPTIONS] [-- EXTRA_TRAIN_ARGS...]

Runs, from the repository root:
  env CUDA_VISIBLE_DEVICES=... python -m entrorouter_jax.train --config=CONFIG \
      --workdir=WORKDIR --config.mesh.data=D --config.mesh.fsdp=F \
      --config.mesh.tensor=T [EXTRA_TRAIN_ARGS...]

Options (default in brackets):
  --gpus GPUS        a count N (uses GPUs 0..N-1) or a list such as 0,1,2,3;
                     sets CUDA_VISIBLE_DEVICES; 'all' leaves it unset [all]
  --config FILE      config file [configs/rl.py]
  --workdir DIR      run directory [workdirs/gpu_node]
  --data-dir DIR     TFDS data dir (--config.data.data_dir) ['' = config's]
  --mesh-data N      config.mesh.data, -1 fills the GPUs left over [-1]
  --mesh-fsdp N      config.mesh.fsdp [1]
  --mesh-tensor N    config.mesh.tensor [1]
  --python EXE       Python interpreter [python]
  --dry-run          print the command (prefixed with '+ ') instead of running it
  -h, --help         this text

Example:
  launch/gpu_node.sh --gpus=8 --mesh-fsdp=8 -- --config.model.size=base --config.model.dtype=bfloat16
USAGE
}

LAUNCH_SCRIPT=launch/gpu_node.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPUS=all
WORKDIR=workdirs/gpu_node
gpu_train_options
OPTIONS+=([--gpus]=GPUS)
parse_options "$@"

ENV=()
if [[ "$GPUS" =~ ^[0-9]+$ ]]; then
  (( GPUS > 0 )) || die "--gpus must be at least 1"
  ENV=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))")
elif [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)+$ ]]; then
  ENV=("CUDA_VISIBLE_DEVICES=$GPUS")
elif [[ "$GPUS" != all ]]; then
  die "--gpus must be a count, a comma-separated list or 'all', not '$GPUS'"
fi
train_command

cd "$(dirname "$0")/.."   # config paths are relative to the repository root
run env "${ENV[@]}" "${TRAIN_CMD[@]}"
