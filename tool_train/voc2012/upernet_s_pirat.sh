#!/bin/sh
# Train: UperNet + ConvNeXt-S, PIR-AT (100 % PGD-5 batches at 4/255, robust ImageNet backbone) on VOC2012.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/voc2012/upernet_s_pirat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/voc2012/voc2012_upernet_s_pirat.yaml "$@"
