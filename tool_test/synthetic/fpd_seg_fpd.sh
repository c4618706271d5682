#!/bin/sh
# Clean and PGD evaluation of the synthetic FPD-Seg trained by tool_train/synthetic/fpd_seg_fpd.sh.
# Usage: [NGPU=n] sh tool_test/synthetic/fpd_seg_fpd.sh [section.key=value ...]
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_test/synthetic/fpd_seg_fpd.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/synthetic/synthetic_fpd_seg_fpd.yaml "$@"
