#!/bin/sh
# Clean and attacked evaluation of the synthetic DDC-AT PSPNet-18 trained by tool_train/synthetic/pspnet18_ddcat.sh
# (the deployed main branch f_n).
# Usage: [NGPU=n] sh tool_test/synthetic/pspnet18_ddcat.sh [section.key=value ...]
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_test/synthetic/pspnet18_ddcat.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/synthetic/synthetic_pspnet18_ddcat.yaml "$@"
