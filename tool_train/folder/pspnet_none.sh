#!/bin/sh
# Train: PSPNet-50, clean training on your own labelled images (data.root=DIR data.classes=N).
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/folder/pspnet_none.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/folder/folder_pspnet_none.yaml "$@"
