#!/bin/sh
# Train: DeepLabv3-50 (ASPP), clean training on Cityscapes.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/cityscapes/deeplabv3_none.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/cityscapes/cityscapes_deeplabv3_none.yaml "$@"
