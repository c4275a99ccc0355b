#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install entrorouter_jax on every worker,
# train on every worker at once, follow the log, delete it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh SUBCOMMAND [OPTIONS] [-- EXTRA_TRAIN_ARGS...]

Subcommands:
  create    gcloud compute tpus tpu-vm create NAME (the slice)
  install   on every worker (--worker=all): clone --repo at --branch into
            ~/entrorouter_jax, then pip install -e it together with jax[tpu]
  train     on every worker (--worker=all): run python -m entrorouter_jax.train
            in the background (log: ~/entrorouter_jax/train.log); arguments
            after -- are added to the train command (e.g. --config.mesh.fsdp=4)
  logs      follow worker 0's train log over ssh
  delete    delete the slice

Options (default in brackets):
  --name NAME        TPU VM name [entrorouter]
  --zone ZONE        zone [us-central2-b]
  --project PROJECT  GCP project ['' = gcloud's configured project]
  --type TYPE        accelerator type: v4-8, v4-32, v5litepod-16, v5p-8, ... [v4-8]
  --version VERSION  TPU runtime ['' = from --type: v4 -> tpu-ubuntu2204-base,
                     v5litepod -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5,
                     v6e -> v2-alpha-tpuv6e]
  --bucket BUCKET    GCS bucket (no gs://) for the workdir and TFDS data ['']
                     (train needs it unless --workdir and --data-dir are given)
  --workdir DIR      train workdir [gs://BUCKET/entrorouter/NAME]
  --data-dir DIR     TFDS data dir [gs://BUCKET/tensorflow_datasets]
  --config FILE      config file, relative to the repository root [configs/rl.py]
  --repo URL         git URL to install from ['' = this checkout's origin remote]
  --branch BRANCH    git branch [main]
  --dry-run          print each command (prefixed with '+ ') instead of running it
  -h, --help         this text

Example:
  launch/tpu_vm.sh create --type=v4-32 --name=er
  launch/tpu_vm.sh install --type=v4-32 --name=er --repo=https://github.com/ORG/entrorouter_jax.git
  launch/tpu_vm.sh train --name=er --bucket=my-bucket -- --config.mesh.fsdp=4
USAGE
}

LAUNCH_SCRIPT=launch/tpu_vm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SUBCOMMAND=''
NAME=entrorouter
ZONE=us-central2-b
PROJECT=''
TYPE=v4-8
VERSION=''
BUCKET=''
WORKDIR=''
DATA_DIR=''
CONFIG=configs/rl.py
REPO=''
BRANCH=main
OPTIONS+=([--name]=NAME [--zone]=ZONE [--project]=PROJECT [--type]=TYPE [--version]=VERSION
          [--bucket]=BUCKET [--workdir]=WORKDIR [--data-dir]=DATA_DIR [--config]=CONFIG
          [--repo]=REPO [--branch]=BRANCH)

on_word() {
  case "$1" in
    create|install|train|logs|delete)
      [[ -z "$SUBCOMMAND" ]] || die "two subcommands: $SUBCOMMAND and $1"
      SUBCOMMAND="$1" ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
}
parse_options "$@"

[[ -n "$SUBCOMMAND" ]] || { usage >&2; die "missing subcommand"; }

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default --version for --type=$TYPE; pass --version" ;;
  esac
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || COMMON+=(--project="$PROJECT")
REMOTE_DIR=entrorouter_jax   # relative to the worker's home directory
LOG=train.log                # inside REMOTE_DIR

ssh_all() { run "${GCLOUD_TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$1"; }

case "$SUBCOMMAND" in
  create)
    run "${GCLOUD_TPU[@]}" create "$NAME" "${COMMON[@]}" \
      --accelerator-type="$TYPE" --version="$VERSION"
    ;;
  install)
    if [[ -z "$REPO" ]]; then
      REPO="$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)"
      [[ -n "$REPO" ]] || die "--repo not given and this checkout has no origin remote"
    fi
    remote="set -e; if [ -d $REMOTE_DIR/.git ]; then"
    remote+=" git -C $REMOTE_DIR fetch $(q "$REPO") $(q "$BRANCH")"
    remote+=" && git -C $REMOTE_DIR checkout -B $(q "$BRANCH") FETCH_HEAD;"
    remote+=" else git clone --branch $(q "$BRANCH") $(q "$REPO") $REMOTE_DIR; fi;"
    remote+=" python3 -m pip install -U -e './${REMOTE_DIR}[gcs]' 'jax[tpu]'"
    remote+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ssh_all "$remote"
    ;;
  train)
    if [[ -z "$WORKDIR" || -z "$DATA_DIR" ]]; then
      [[ -n "$BUCKET" ]] || die "train needs --bucket (or both --workdir and --data-dir)"
    fi
    [[ -n "$WORKDIR" ]] || WORKDIR="gs://$BUCKET/entrorouter/$NAME"
    [[ -n "$DATA_DIR" ]] || DATA_DIR="gs://$BUCKET/tensorflow_datasets"
    # --distributed=on: every worker joins jax.distributed (the slice comes from the
    # TPU metadata server, which the environment alone does not show).
    cmd="python3 -m entrorouter_jax.train --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")"
    cmd+=" --distributed=on"
    cmd+=" --config.data.data_dir=$(q "$DATA_DIR")"
    for a in "${EXTRA[@]}"; do cmd+=" $(q "$a")"; done
    # nohup + redirected stdin/stdout/stderr: ssh returns at once, training goes on.
    ssh_all "cd $REMOTE_DIR && nohup $cmd > $LOG 2>&1 < /dev/null &"
    ;;
  logs)
    run "${GCLOUD_TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 \
      --command="tail -n 200 -F $REMOTE_DIR/$LOG"
    ;;
  delete)
    run "${GCLOUD_TPU[@]}" delete "$NAME" "${COMMON[@]}" --quiet
    ;;
esac
