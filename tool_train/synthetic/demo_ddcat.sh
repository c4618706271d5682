#!/bin/sh
# Robustness demo (tools/demo.py): DDC-AT of the demo PSPNet on the built-in synthetic dataset.
# Usage: [NGPU=n] sh tool_train/synthetic/demo_ddcat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/synthetic/synthetic_demo_ddcat.yaml "$@"
