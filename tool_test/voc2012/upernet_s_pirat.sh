#!/bin/sh
# Evaluate (clean and the configured attacks): UperNet + ConvNeXt-S, PIR-AT (100 % PGD-5 batches at 4/255, robust ImageNet backbone) on VOC2012.
# Usage: [NGPU=n] sh tool_test/voc2012/upernet_s_pirat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/voc2012/voc2012_upernet_s_pirat.yaml "$@"
