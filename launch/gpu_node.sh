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

die() { echo "error: $*" >&2; echo "Run launch/gpu_node.sh --help for usage." >&2; exit 2; }

# q (quote a word for the printed command) and run (print, then run unless --dry-run).
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPUS=all
CONFIG=configs/rl.py
WORKDIR=workdirs/gpu_node
DATA_DIR=''
MESH_DATA=-1
MESH_FSDP=1
MESH_TENSOR=1
PYTHON=python
EXTRA=()

while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    --gpus=*|--config=*|--workdir=*|--data-dir=*|--mesh-data=*|--mesh-fsdp=*|\
    --mesh-tensor=*|--python=*)
      opt="${1%%=*}"; set -- "$opt" "${1#*=}" "${@:2}"; continue ;;
    --gpus) GPUS="${2?--gpus needs a value}"; shift ;;
    --config) CONFIG="${2?--config needs a value}"; shift ;;
    --workdir) WORKDIR="${2?--workdir needs a value}"; shift ;;
    --data-dir) DATA_DIR="${2?--data-dir needs a value}"; shift ;;
    --mesh-data) MESH_DATA="${2?--mesh-data needs a value}"; shift ;;
    --mesh-fsdp) MESH_FSDP="${2?--mesh-fsdp needs a value}"; shift ;;
    --mesh-tensor) MESH_TENSOR="${2?--mesh-tensor needs a value}"; shift ;;
    --python) PYTHON="${2?--python needs a value}"; shift ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

ENV=()
if [[ "$GPUS" =~ ^[0-9]+$ ]]; then
  (( GPUS > 0 )) || die "--gpus must be at least 1"
  ENV=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))")
elif [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)+$ ]]; then
  ENV=("CUDA_VISIBLE_DEVICES=$GPUS")
elif [[ "$GPUS" != all ]]; then
  die "--gpus must be a count, a comma-separated list or 'all', not '$GPUS'"
fi
for v in "$MESH_DATA" "$MESH_FSDP" "$MESH_TENSOR"; do
  [[ "$v" =~ ^-?[0-9]+$ ]] || die "mesh sizes must be integers, not '$v'"
done

CMD=("$PYTHON" -m entrorouter_jax.train --config="$CONFIG" --workdir="$WORKDIR"
     --config.mesh.data="$MESH_DATA" --config.mesh.fsdp="$MESH_FSDP"
     --config.mesh.tensor="$MESH_TENSOR")
[[ -z "$DATA_DIR" ]] || CMD+=(--config.data.data_dir="$DATA_DIR")
CMD+=("${EXTRA[@]}")

cd "$(dirname "$0")/.."   # config paths are relative to the repository root
run env "${ENV[@]}" "${CMD[@]}"
