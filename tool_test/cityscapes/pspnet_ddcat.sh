#!/bin/sh
# Evaluate (clean and the configured attacks): PSPNet-50, DDC-AT on Cityscapes.
# Usage: [NGPU=n] sh tool_test/cityscapes/pspnet_ddcat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/cityscapes/cityscapes_pspnet_ddcat.yaml "$@"
