#!/bin/sh
# Train: Segmenter ViT-S/16, PIR-AT (100 % PGD-5 batches at 4/255, robust ImageNet ViT-S) on ADE20K.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/ade20k/segmenter_pirat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/ade20k/ade20k_segmenter_pirat.yaml "$@"
