#!/bin/sh
# Clean and attacked evaluation of the synthetic PSPNet-18 trained by tool_train/synthetic/pspnet18_sat.sh.
# Usage: [NGPU=n] sh tool_test/synthetic/pspnet18_sat.sh [section.key=value ...]
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_test/synthetic/pspnet18_sat.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/synthetic/synthetic_pspnet18_sat.yaml "$@"
