#!/bin/sh
# Evaluate (clean and the configured attacks): DRN-D-22 segmentation, clean training on Cityscapes downscaled by 3.
# Usage: [NGPU=n] sh tool_test/cityscapes/drn_none.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/cityscapes/cityscapes_drn_none.yaml "$@"
