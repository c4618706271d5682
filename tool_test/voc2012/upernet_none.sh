#!/bin/sh
# Evaluate (clean and the configured attacks): UperNet + ConvNeXt-T, clean training on VOC2012 with the PIR-AT pipeline.
# Usage: [NGPU=n] sh tool_test/voc2012/upernet_none.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/voc2012/voc2012_upernet_none.yaml "$@"
