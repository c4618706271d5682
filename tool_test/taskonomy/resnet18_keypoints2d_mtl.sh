#!/bin/sh
# Evaluate (clean and the configured attacks; every task scored): Taskonomy ResNet-18, segmentation + keypoints2d, mtl.
# Usage: [NGPU=n] sh tool_test/taskonomy/resnet18_keypoints2d_mtl.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/taskonomy/taskonomy_resnet18_keypoints2d_mtl.yaml "$@"
