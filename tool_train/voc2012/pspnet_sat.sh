#!/bin/sh
# Train: PSPNet-50, SAT on VOC2012 train_aug.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/voc2012/pspnet_sat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/voc2012/voc2012_pspnet_sat.yaml "$@"
