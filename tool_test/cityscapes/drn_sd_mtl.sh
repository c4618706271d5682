#!/bin/sh
# Evaluate (clean and the configured attacks; every task scored): DRN-D-22 multitask "sd", mtl on Cityscapes.
# Usage: [NGPU=n] sh tool_test/cityscapes/drn_sd_mtl.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/cityscapes/cityscapes_drn_sd_mtl.yaml "$@"
