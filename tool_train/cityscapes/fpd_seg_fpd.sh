#!/bin/sh
# Train: FPD-Seg (ResNet-101) with FPD's two-phase method on Cityscapes; add train.fpd.adversarial=true
# model.weights=<its checkpoint> train.lr=1e-5 for the adversarial fine-tuning (see the config).
# Usage: [NGPU=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] sh tool_train/cityscapes/fpd_seg_fpd.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/cityscapes/cityscapes_fpd_seg_fpd.yaml "$@"
