#!/bin/sh
# Train: Taskonomy ResNet-18 encoder-decoder, clean single-task segmentation.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/taskonomy/resnet18_none.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/taskonomy/taskonomy_resnet18_none.yaml "$@"
