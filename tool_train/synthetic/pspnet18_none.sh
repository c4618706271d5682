#!/bin/sh
# Clean training of PSPNet (ResNet-18, half width) on the built-in synthetic dataset (sized for a CPU).
# Usage: [NGPU=n] sh tool_train/synthetic/pspnet18_none.sh [section.key=value ...]
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_train/synthetic/pspnet18_none.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/synthetic/synthetic_pspnet18_none.yaml "$@"
