#!/bin/sh
# Train: Taskonomy ResNet-18, segmentation + autoencoder (lambda 0.01), multitask training (mtl).
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/taskonomy/resnet18_autoencoder_mtl.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/taskonomy/taskonomy_resnet18_autoencoder_mtl.yaml "$@"
