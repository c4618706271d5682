#!/bin/sh
# Example SLURM batch script: 2 nodes x 4 GPUs, one launcher task per node (each starts torchrun,
# which starts one process per GPU). Adapt the #SBATCH lines to your cluster, then:
#   sbatch tools/slurm_example.sh tool_train/cityscapes/pspnet_none.sh [section.key=value ...]
#SBATCH --job-name=segrobust
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
# The GPUs per node come from the allocation, the rendezvous port and id from the job id (two jobs on
# one node do not collide). With several nodes a process that dies restarts every process up to
# RESTARTS times (default 3), and training continues from its newest checkpoint (add
# train.save_iter_freq=N for checkpoints inside an epoch). A job killed by the time limit or
# preemption continues when resubmitted with train.resume=auto, e.g. with
#   sbatch --dependency=afterany:<jobid> tools/slurm_example.sh <same arguments>
# Every node must see the repository and exp_dir on a shared file system (docs/scale.md).

script=${1:?usage: sbatch tools/slurm_example.sh tool_train/<dataset>/<model>_<method>.sh [overrides]}
shift
NNODES=${SLURM_NNODES:-1}
export NNODES
# GPUs on this node: SLURM_GPUS_ON_NODE, else --gpus-per-node (which may read "type:count")
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
export NGPU=${NGPU:-${gpus##*:}}
if [ "$NNODES" -gt 1 ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    export RDZV_ENDPOINT=${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}
fi  # one node: torchrun picks a free port itself
export RDZV_ID=${RDZV_ID:-slurm-${SLURM_JOB_ID:-0}}
# srun's tasks no longer inherit --cpus-per-task from sbatch (Slurm 22.05+): pass it on
cpus=${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}
# NODE_RANK differs per node, so it is set inside the task from SLURM_NODEID
srun --kill-on-bad-exit=1 $cpus sh -c 'NODE_RANK=$SLURM_NODEID exec sh "$0" "$@"' "$script" "$@"
