# Shared by the launch scripts (sourced, not run): the option loop, errors,
# command printing and --dry-run, and the train command of the GPU launchers.
# shellcheck shell=bash

# The sourcing script sets LAUNCH_SCRIPT (its path as users type it) and
# defines usage(); it fills OPTIONS (option -> variable) before parse_options.
declare -A OPTIONS=()
DRY_RUN=0
EXTRA=()

die() {
  echo "error: $*" >&2
  echo "Run ${LAUNCH_SCRIPT:-the script} --help for usage." >&2
  exit 2
}

# parse_options "$@": -h/--help, --dry-run, `-- EXTRA...`, and every option of
# OPTIONS as `--name VALUE` or `--name=VALUE`. A word that is not an option goes
# to the script's on_word function where it defines one (subcommands).
parse_options() {
  local opt
  while (( $# )); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; EXTRA=("$@"); break ;;
      --*=*)
        opt="${1%%=*}"
        [[ -n "${OPTIONS[$opt]:-}" ]] || { usage >&2; die "unknown argument: $1"; }
        printf -v "${OPTIONS[$opt]}" '%s' "${1#*=}" ;;
      --*)
        [[ -n "${OPTIONS[$1]:-}" ]] || { usage >&2; die "unknown argument: $1"; }
        (( $# >= 2 )) || die "$1 needs a value"
        printf -v "${OPTIONS[$1]}" '%s' "$2"
        shift ;;
      *)
        if declare -F on_word > /dev/null; then
          on_word "$1"
        else
          usage >&2; die "unknown argument: $1"
        fi ;;
    esac
    shift
  done
}

# The options every GPU launcher takes, with their defaults (WORKDIR is the caller's).
gpu_train_options() {
  CONFIG=configs/rl.py
  DATA_DIR=''
  MESH_DATA=-1
  MESH_FSDP=1
  MESH_TENSOR=1
  PYTHON=python
  OPTIONS+=([--config]=CONFIG [--workdir]=WORKDIR [--data-dir]=DATA_DIR [--mesh-data]=MESH_DATA
            [--mesh-fsdp]=MESH_FSDP [--mesh-tensor]=MESH_TENSOR [--python]=PYTHON)
}

# TRAIN_CMD: python -m entrorouter_jax.train with the config, workdir, mesh, data dir
# and EXTRA (after checking the mesh sizes).
train_command() {
  local v
  for v in "$MESH_DATA" "$MESH_FSDP" "$MESH_TENSOR"; do
    [[ "$v" =~ ^-?[0-9]+$ ]] || die "mesh sizes must be integers, not '$v'"
  done
  TRAIN_CMD=("$PYTHON" -m entrorouter_jax.train --config="$CONFIG" --workdir="$WORKDIR"
             --config.mesh.data="$MESH_DATA" --config.mesh.fsdp="$MESH_FSDP"
             --config.mesh.tensor="$MESH_TENSOR")
  [[ -z "$DATA_DIR" ]] || TRAIN_CMD+=(--config.data.data_dir="$DATA_DIR")
  TRAIN_CMD+=("${EXTRA[@]}")
}

# Quote one word for a POSIX shell only where it needs it.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD...: print the command (prefixed with '+ '), then run it unless --dry-run.
run() {
  local out='+' a
  for a in "$@"; do out+=" $(q "$a")"; done
  if (( DRY_RUN )); then
    echo "$out"
  else
    echo "$out" >&2
    "$@"
  fi
}
