#!/bin/sh
# Evaluate (clean and the configured attacks): FPD-Seg (ResNet-101) trained with FPD on Cityscapes.
# Usage: [NGPU=n] sh tool_test/cityscapes/fpd_seg_fpd.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/cityscapes/cityscapes_fpd_seg_fpd.yaml "$@"
