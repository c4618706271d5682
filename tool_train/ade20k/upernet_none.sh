#!/bin/sh
# Train: UperNet + ConvNeXt-T, clean training on ADE20K with the PIR-AT pipeline.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/ade20k/upernet_none.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/ade20k/ade20k_upernet_none.yaml "$@"
