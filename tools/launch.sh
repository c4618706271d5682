#!/bin/sh
# Shared launcher, sourced by every script in tool_train/ and tool_test/.
#   launch train|test CONFIG [section.key=value ...]
# Environment: NGPU (processes per node, default 1), NNODES (1), NODE_RANK (0), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (a free port on single-node runs), PYTHON (python3).
# Runs from the repository root whatever the caller's working directory, and tees the console
# into <exp_dir>/<kind>-<timestamp>.log.

launch() {
    kind=$1
    config=$2
    shift 2
    root=$(cd "$(dirname "$0")/../.." && pwd)
    cd "$root" || exit 1
    PYTHON=${PYTHON:-python3}
    NGPU=${NGPU:-1}
    NNODES=${NNODES:-1}
    NODE_RANK=${NODE_RANK:-0}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    exp_dir=$("$PYTHON" -m utils.config "$config" --get exp_dir "$@") || exit 2
    mkdir -p "$exp_dir"
    log="$exp_dir/$kind-$(date +%Y%m%d_%H%M%S).log"
    rcfile=$(mktemp)
    if [ "$NGPU" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
        if [ -z "${MASTER_PORT:-}" ]; then
            MASTER_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
        fi
        set -- -m torch.distributed.run --nproc_per_node="$NGPU" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$kind.py" --config "$config" "$@"
    else
        set -- "$kind.py" --config "$config" "$@"
    fi
    { SEGROBUST_LOG_TEED=1 PYTHONUNBUFFERED=1 "$PYTHON" "$@" 2>&1; echo $? >"$rcfile"; } | tee "$log"
    rc=$(cat "$rcfile")
    rm -f "$rcfile"
    return "$rc"
}
