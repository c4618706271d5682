#!/bin/sh
# Robustness demo (tools/demo.py): clean, BIM-2, PGD-10 and SEA evaluation of tool_train/synthetic/demo_pirat.sh's model.
# Usage: [NGPU=n] sh tool_test/synthetic/demo_pirat.sh [section.key=value ...]
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/synthetic/synthetic_demo_pirat.yaml "$@"
