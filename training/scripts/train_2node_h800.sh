#!/usr/bin/env bash
# Two H800 nodes (2 x 8 GPUs): run this on both, with the same MASTER_ADDR and NODE_RANK 0 / 1.
#
#   export USE_VGGT_CACHE=true MASTER_ADDR=10.0.0.1 NODE_RANK=0   # 1 on the second node
#   DATA_ROOT=/nfs/train bash training/scripts/train_2node_h800.sh
#
# Both nodes must see the same DATA_ROOT (NFS or other shared storage): the cache
# files live next to the images, so every node shares them. Everything else as
# in train_h800.sh, which this script runs with NNODES=2.
set -euo pipefail

export NNODES="${NNODES:-2}"
if [[ -z "${MASTER_ADDR:-}" || -z "${NODE_RANK:-}" ]]; then
    echo "[ERROR] set MASTER_ADDR (node 0's address) and NODE_RANK (0..$((NNODES - 1))) on every node" >&2
    exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/train_h800.sh" "$@"
