#!/bin/sh
# Evaluate (clean and the configured attacks; every task scored): DRN-D-22 multitask "sdA", mtl on Cityscapes.
# Usage: [NGPU=n] sh tool_test/cityscapes/drn_sdA_mtl.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/cityscapes/cityscapes_drn_sdA_mtl.yaml "$@"
