#!/bin/sh
# Shared launcher, sourced by every script in tool_train/ and tool_test/.
#   launch train|test CONFIG [section.key=value ...]
# Environment:
#   NGPU         processes per node (default 1): one per GPU; on a CPU-only node, NGPU>1 starts
#                that many CPU (gloo) processes only with the override device=cpu
#   NNODES       number of machines (default 1); run the same command on each with its NODE_RANK
#   NODE_RANK    this machine's rank, 0..NNODES-1 (default 0)
#   MASTER_ADDR  address of the NODE_RANK=0 machine (required when NNODES>1)
#   MASTER_PORT  port on MASTER_ADDR (NNODES>1: default 29500; single node: a free port is chosen)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous (default MASTER_ADDR:MASTER_PORT when NNODES>1 or
#                MASTER_PORT is set; otherwise a single node rendezvous on a free port)
#   RDZV_ID      id of the rendezvous, the same on every node (default: derived from exp_dir)
#   RESTARTS     torchrun --max-restarts: how often a job whose process died restarts every process
#                (default 0 on one node, 3 with NNODES>1); a restarted training resumes from its newest
#                checkpoint (train.resume=auto is implied), a restarted evaluation from its counts
#   PYTHON       interpreter (default python3)
# Several processes or nodes go through torchrun (c10d rendezvous; NCCL on GPUs, gloo on CPU).
# The launch is checked first (tools/preflight.py): NGPU against the visible GPUs, batch sizes
# against the number of processes, the resume path. Runs from the repository root whatever the
# caller's working directory; the console is teed into <exp_dir>/<kind>-<timestamp>.log (with several
# nodes the rank-0 process writes that file; nothing else is copied into exp_dir).

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
    # numbers only: anything else would reach torchrun (or a shell test) as text
    for var in NGPU NNODES NODE_RANK ${MASTER_PORT:+MASTER_PORT} ${RESTARTS:+RESTARTS}; do
        eval "value=\$$var"
        case $value in
            '' | *[!0-9]*)
                echo "error: $var must be a non-negative integer, got '$value'" >&2
                return 2 ;;
        esac
    done
    if [ "$NODE_RANK" -ge "$NNODES" ]; then
        echo "error: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
        return 2
    fi
    if [ -n "${MASTER_PORT:-}" ] && { [ "$MASTER_PORT" -lt 1 ] || [ "$MASTER_PORT" -gt 65535 ]; }; then
        echo "error: MASTER_PORT must be a port number in 1..65535, got '$MASTER_PORT'" >&2
        return 2
    fi
    if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
        echo "error: NNODES=$NNODES needs MASTER_ADDR (the address of the NODE_RANK=0 machine) or RDZV_ENDPOINT" >&2
        return 2
    fi
    exp_dir=$("$PYTHON" tools/preflight.py "$kind" "$config" "$NGPU" "$NNODES" "$@") || return 2
    teed=1
    if [ "$NNODES" -gt 1 ]; then
        # the rendezvous decides which node hosts rank 0: that process writes the log file itself
        log=/dev/null
        teed=
    else
        mkdir -p -- "$exp_dir"
        log="$exp_dir/$kind-$(date +%Y%m%d_%H%M%S).log"
    fi
    rcfile=$(mktemp)
    if [ "$NNODES" -gt 1 ]; then RESTARTS=${RESTARTS:-3}; else RESTARTS=${RESTARTS:-0}; fi
    # one id per experiment unless given: every node derives the same one from the same config
    RDZV_ID=${RDZV_ID:-segrobust-$(printf '%s' "$exp_dir" | cksum | cut -d ' ' -f 1)}
    if [ "$NNODES" -gt 1 ] || [ -n "${RDZV_ENDPOINT:-}" ] || { [ "$NGPU" -gt 1 ] && [ -n "${MASTER_PORT:-}" ]; }; then
        # c10d rendezvous: the nodes meet at RDZV_ENDPOINT; after a failure every process restarts
        # (up to RESTARTS times) and meets again there. The processes get a new store for each round
        # (rank 0's node hosts it on a free port): in the rendezvous' own store, which outlives a
        # round, the restarted processes would read the dead ones' addresses and fail to connect
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
        set -- -m torch.distributed.run --nproc_per_node="$NGPU" --nnodes="$NNODES" --rdzv_backend=c10d \
            --rdzv_endpoint="${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}}" \
            --rdzv_id="$RDZV_ID" --max_restarts="$RESTARTS" "$kind.py" --config "$config" "$@"
    elif [ "$NGPU" -gt 1 ] || [ "$RESTARTS" -gt 0 ]; then
        # --standalone: torchrun binds a free local port itself, so concurrent jobs never collide
        set -- -m torch.distributed.run --standalone --nproc_per_node="$NGPU" --max_restarts="$RESTARTS" \
            "$kind.py" --config "$config" "$@"
    else
        set -- "$kind.py" --config "$config" "$@"
    fi
    { SEGROBUST_LOG_TEED=$teed PYTHONUNBUFFERED=1 "$PYTHON" "$@" 2>&1; echo $? >"$rcfile"; } | tee -- "$log"
    rc=$(cat "$rcfile")
    rm -f "$rcfile"
    return "$rc"
}
