#!/bin/sh
# Adversarial multitask training (mtl) of the Taskonomy ResNet-18 (half width) on the synthetic dataset with
# segmentation, depth and reconstruction (sized for a CPU).
# Usage: [NGPU=n] sh tool_train/synthetic/resnet18_sdA_mtl.sh [section.key=value ...]
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_train/synthetic/resnet18_sdA_mtl.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/synthetic/synthetic_resnet18_sdA_mtl.yaml "$@"
