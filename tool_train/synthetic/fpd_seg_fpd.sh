#!/bin/sh
# FPD two-phase training of FPD-Seg (ResNet-18, quarter width) on the built-in synthetic dataset (sized for a CPU).
# Usage: [NGPU=n] sh tool_train/synthetic/fpd_seg_fpd.sh [section.key=value ...]
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_train/synthetic/fpd_seg_fpd.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/synthetic/synthetic_fpd_seg_fpd.yaml "$@"
