#!/bin/sh
# Evaluate (clean and the configured attacks): PSPNet-50, SAT on Cityscapes.
# Usage: [NGPU=n] sh tool_test/cityscapes/pspnet_sat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/cityscapes/cityscapes_pspnet_sat.yaml "$@"
