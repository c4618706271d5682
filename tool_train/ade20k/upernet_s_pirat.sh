#!/bin/sh
# Train: UperNet + ConvNeXt-S, PIR-AT (100 % PGD-20 batches at 4/255, robust ImageNet backbone) on ADE20K.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/ade20k/upernet_s_pirat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/ade20k/ade20k_upernet_s_pirat.yaml "$@"
