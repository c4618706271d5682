#!/bin/sh
# Evaluate (clean and the configured attacks; every task scored): Taskonomy ResNet-18, segmentation + edge_occlusion, mtl.
# Usage: [NGPU=n] sh tool_test/taskonomy/resnet18_edge_occlusion_mtl.sh [test.checkpoint=FILE_OR_FOLDER] [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/taskonomy/taskonomy_resnet18_edge_occlusion_mtl.yaml "$@"
