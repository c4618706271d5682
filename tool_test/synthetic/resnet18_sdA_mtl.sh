#!/bin/sh
# Clean and PGD evaluation (every task scored) of the synthetic multitask ResNet-18 trained by
# tool_train/synthetic/resnet18_sdA_mtl.sh.
# Usage: [NGPU=n] sh tool_test/synthetic/resnet18_sdA_mtl.sh [section.key=value ...]
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_test/synthetic/resnet18_sdA_mtl.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/synthetic/synthetic_resnet18_sdA_mtl.yaml "$@"
