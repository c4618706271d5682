#!/bin/sh
# Train: DeepLabv3-50 (ASPP), DDC-AT on Cityscapes.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/cityscapes/deeplabv3_ddcat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/cityscapes/cityscapes_deeplabv3_ddcat.yaml "$@"
