#!/bin/sh
# Evaluate (clean and the configured attacks): DeepLabv3-50 (ASPP), SAT on Cityscapes.
# Usage: [NGPU=n] sh tool_test/cityscapes/deeplabv3_sat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/cityscapes/cityscapes_deeplabv3_sat.yaml "$@"
