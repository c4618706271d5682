#!/bin/sh
# Evaluate (clean and the configured attacks): PSPNet-50, PIR-AT (100 % PGD-5 batches at 4/255, robust ImageNet ResNet-50) on VOC2012.
# Usage: [NGPU=n] sh tool_test/voc2012/pspnet_pirat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/voc2012/voc2012_pspnet_pirat.yaml "$@"
