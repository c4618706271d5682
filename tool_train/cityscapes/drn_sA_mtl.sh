#!/bin/sh
# Train: DRN-D-22 multitask "sA" (segmentation + reconstruction), adversarial multitask training (mtl) on Cityscapes downscaled by 3.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/cityscapes/drn_sA_mtl.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/cityscapes/cityscapes_drn_sA_mtl.yaml "$@"
