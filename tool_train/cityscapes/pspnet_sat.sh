#!/bin/sh
# Train: PSPNet-50, SAT on Cityscapes.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/cityscapes/pspnet_sat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/cityscapes/cityscapes_pspnet_sat.yaml "$@"
