#!/bin/sh
# Evaluate (clean and the configured attacks): Taskonomy ResNet-18 encoder-decoder, clean single-task segmentation.
# Usage: [NGPU=n] sh tool_test/taskonomy/resnet18_none.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/taskonomy/taskonomy_resnet18_none.yaml "$@"
