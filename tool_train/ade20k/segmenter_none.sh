#!/bin/sh
# Train: Segmenter ViT-S/16, clean training on ADE20K.
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/ade20k/segmenter_none.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/ade20k/ade20k_segmenter_none.yaml "$@"
