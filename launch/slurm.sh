#!/usr/bin/env bash
# SLURM, several GPU nodes: writes an sbatch script that starts one process per
# GPU with srun, and submits it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh [OPTIONS] [-- EXTRA_TRAIN_ARGS...]

Writes an sbatch script (--script) with --nodes=N, --ntasks-per-node=GPUS
(one process per GPU) and --gpus-per-task=1, whose body runs
  srun python -m entrorouter_jax.train --config=CONFIG --workdir=WORKDIR \
      --config.mesh.data=D --config.mesh.fsdp=F --config.mesh.tensor=T [EXTRA...]
from the repository root, then submits it with sbatch. With --dry-run the
script is printed instead of written, and the sbatch command is printed
(prefixed with '+ ') instead of run.

WORKDIR (and --data-dir) must be on a filesystem every node shares.

Options (default in brackets):
  --nodes N            nodes [2]
  --gpus-per-node N    GPUs per node = tasks per node [8]
  --partition NAME     partition ['' = the cluster's default]
  --time LIMIT         time limit [04:00:00]
  --job-name NAME      job name [entrorouter]
  --config FILE        config file [configs/rl.py]
  --workdir DIR        run directory, on a shared filesystem [workdirs/slurm]
  --data-dir DIR       TFDS data dir (--config.data.data_dir) ['' = config's]
  --mesh-data N        config.mesh.data, -1 fills the GPUs left over [-1]
  --mesh-fsdp N        config.mesh.fsdp [1]
  --mesh-tensor N      config.mesh.tensor [1]
  --python EXE         Python interpreter on the nodes [python]
  --script PATH        where to write the sbatch script [launch/entrorouter.sbatch]
  --dry-run            print instead of writing and submitting
  -h, --help           this text

Example:
  launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --mesh-fsdp=8 -- --config.model.size=large
USAGE
}

LAUNCH_SCRIPT=launch/slurm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NODES=2
GPUS_PER_NODE=8
PARTITION=''
TIME=04:00:00
JOB_NAME=entrorouter
WORKDIR=workdirs/slurm
SCRIPT=launch/entrorouter.sbatch
gpu_train_options
OPTIONS+=([--nodes]=NODES [--gpus-per-node]=GPUS_PER_NODE [--partition]=PARTITION [--time]=TIME
          [--job-name]=JOB_NAME [--script]=SCRIPT)
parse_options "$@"

for v in "$NODES" "$GPUS_PER_NODE"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--nodes and --gpus-per-node must be positive integers, not '$v'"
done

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
train_command
CMD=(srun "${TRAIN_CMD[@]}")
srun_line=''
for a in "${CMD[@]}"; do srun_line+="${srun_line:+ }$(q "$a")"; done

sbatch_script() {
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$GPUS_PER_NODE"
  echo '#SBATCH --gpus-per-task=1'
  echo "#SBATCH --time=$TIME"
  [[ -z "$PARTITION" ]] || echo "#SBATCH --partition=$PARTITION"
  echo "#SBATCH --chdir=$REPO_ROOT"
  echo "#SBATCH --output=$JOB_NAME-%j.out"
  echo 'set -euo pipefail'
  echo '# One process per GPU (nodes x ntasks-per-node tasks). In every task'
  echo '# entrorouter_jax.cli sees SLURM_NTASKS > 1 and calls jax.distributed.initialize()'
  echo '# with no arguments: JAX takes the coordinator (the first node of the job), the'
  echo '# number of processes and this process id from the SLURM environment.'
  echo "$srun_line"
}

if (( DRY_RUN )); then
  echo "# $SCRIPT (not written: --dry-run)"
  sbatch_script
else
  mkdir -p "$(dirname "$SCRIPT")"
  sbatch_script > "$SCRIPT"
  echo "wrote $SCRIPT" >&2
fi
run sbatch "$SCRIPT"
