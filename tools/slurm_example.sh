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
# A run killed by the time limit or preemption continues where it stopped when resubmitted with
# train.resume=auto (add train.save_iter_freq=N for checkpoints inside an epoch), e.g. with
#   sbatch --dependency=afterany:<jobid> tools/slurm_example.sh <same arguments>

script=${1:?usage: sbatch tools/slurm_example.sh tool_train/<dataset>/<model>_<method>.sh [overrides]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
export NNODES=$SLURM_NNODES
export NGPU=${NGPU:-4}
# NODE_RANK differs per node, so it is set inside the task from SLURM_NODEID
srun --kill-on-bad-exit=1 sh -c 'NODE_RANK=$SLURM_NODEID exec sh "$0" "$@"' "$script" "$@"
