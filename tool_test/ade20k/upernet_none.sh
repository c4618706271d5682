#!/bin/sh
# Evaluate (clean and the configured attacks): UperNet + ConvNeXt-T, clean training on ADE20K with the PIR-AT pipeline.
# Usage: [NGPU=n] sh tool_test/ade20k/upernet_none.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/ade20k/ade20k_upernet_none.yaml "$@"
