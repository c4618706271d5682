#!/bin/sh
# Evaluate (clean and the configured attacks): Segmenter ViT-S/16, PIR-AT (100 % PGD-5 batches at 4/255, robust ImageNet ViT-S) on ADE20K.
# Usage: [NGPU=n] sh tool_test/ade20k/segmenter_pirat.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/ade20k/ade20k_segmenter_pirat.yaml "$@"
