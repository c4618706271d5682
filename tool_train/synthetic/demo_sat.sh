#!/bin/sh
# Robustness demo (tools/demo.py): SAT of the demo PSPNet on the built-in synthetic dataset.
# Usage: [NGPU=n] sh tool_train/synthetic/demo_sat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch train config/synthetic/synthetic_demo_sat.yaml "$@"
