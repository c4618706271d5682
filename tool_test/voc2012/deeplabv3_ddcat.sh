#!/bin/sh
# Evaluate (clean and the configured attacks): DeepLabv3-50 (ASPP), DDC-AT on VOC2012 train_aug.
# Usage: [NGPU=n] sh tool_test/voc2012/deeplabv3_ddcat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/voc2012/voc2012_deeplabv3_ddcat.yaml "$@"
