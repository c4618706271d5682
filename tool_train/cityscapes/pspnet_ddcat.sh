#!/bin/sh
# Train: PSPNet-50, DDC-AT on Cityscapes.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/cityscapes/pspnet_ddcat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/cityscapes/cityscapes_pspnet_ddcat.yaml "$@"
