#!/bin/sh
# Clean and PGD evaluation of the synthetic PSPNet-18 trained by tool_train/synthetic/pspnet18_pirat.sh.
# Usage: [NGPU=n] sh tool_test/synthetic/pspnet18_pirat.sh [section.key=value ...]
# SEA at 4 and 8/255 on the first 10 images: ... pspnet18_pirat.sh "test.attacks=[sea]" "test.eps=[4,8]" test.num_images=10
# Several CPU processes on a machine without GPUs: NGPU=2 sh tool_test/synthetic/pspnet18_pirat.sh device=cpu
. "$(dirname "$0")/../../tools/launch.sh"
launch test config/synthetic/synthetic_pspnet18_pirat.yaml "$@"
