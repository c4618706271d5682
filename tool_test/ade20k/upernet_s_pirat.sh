#!/bin/sh
# Evaluate (clean and the configured attacks): UperNet + ConvNeXt-S, PIR-AT (100 % PGD-20 batches at 4/255, robust ImageNet backbone) on ADE20K.
# Usage: [NGPU=n] sh tool_test/ade20k/upernet_s_pirat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/ade20k/ade20k_upernet_s_pirat.yaml "$@"
