#!/bin/sh
# Train: DeepLabv3-50 (ASPP), SAT on Cityscapes.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/cityscapes/deeplabv3_sat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/cityscapes/cityscapes_deeplabv3_sat.yaml "$@"
