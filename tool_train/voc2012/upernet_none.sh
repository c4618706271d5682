#!/bin/sh
# Train: UperNet + ConvNeXt-T, clean training on VOC2012 with the PIR-AT pipeline.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/voc2012/upernet_none.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/voc2012/voc2012_upernet_none.yaml "$@"
