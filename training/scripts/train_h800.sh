#!/usr/bin/env bash
# Fine-tune Qwen2.5-VL + VGGT on H800 nodes (8 GPUs each) with torchrun.
#
#   export USE_VGGT_CACHE=true                      # read <image>.vggt_cache.pt next to each image
#   export VGGT_SERVICE_URL=http://gpu-node:8600    # optional: the feature service fills misses
#   DATA_ROOT=/data/train bash training/scripts/train_h800.sh [extra training.train flags]
#
# Environment (defaults in brackets):
#   DATA_ROOT (required)  OUTPUT_DIR [./output/qwen25vl_vggt_<time>]
#   MODEL_PATH [Qwen/Qwen2.5-VL-3B-Instruct]  VGGT_MODEL_PATH [facebook/VGGT-1B]
#   USE_VGGT_CACHE [false]  VGGT_SERVICE_URL (comma-separated)  VGGT_CACHE_FALLBACK [online|error|service]
#   VGGT_PRESET [newjanusvln|janusvln|none]  MAX_HISTORY_IMAGES [8]: the feature spec and the history rule;
#     VGGT_ATTENTION, VGGT_LAYERS, VGGT_DTYPE, VGGT_REFERENCE_FRAME override the preset; the service must match
#   VGGT_FUSION [default|janusvln]: how the merged VGGT tokens join Qwen's
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]  NPROC_PER_NODE [8]
#   PER_DEVICE_BATCH [1]  GRAD_ACCUM [8]  LR [1e-5]  EPOCHS [1]  NUM_WORKERS [4]  SAVE_STEPS [1000]
#   DEEPSPEED (a ZeRO-2 json; unset: plain DDP)  TORCHRUN [torchrun]
#   DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [[ -z "${DATA_ROOT:-}" ]]; then
    echo "[ERROR] DATA_ROOT is not set: export DATA_ROOT=/path/to/train_data" >&2
    exit 2
fi
MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-VL-3B-Instruct}"
VGGT_MODEL_PATH="${VGGT_MODEL_PATH:-facebook/VGGT-1B}"
OUTPUT_DIR="${OUTPUT_DIR:-./output/qwen25vl_vggt_$(date +%Y%m%d_%H%M%S)}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-1}"
GRAD_ACCUM="${GRAD_ACCUM:-8}"
LR="${LR:-1e-5}"
EPOCHS="${EPOCHS:-1}"
NUM_WORKERS="${NUM_WORKERS:-4}"
SAVE_STEPS="${SAVE_STEPS:-1000}"

case "$(printf '%s' "${USE_VGGT_CACHE:-false}" | tr '[:upper:]' '[:lower:]')" in
    true|1|yes) USE_CACHE=true ;;
    *) USE_CACHE=false ;;
esac

cmd=(
    "${TORCHRUN:-torchrun}"
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
    -m vggt_cache.training.train
    --model_name_or_path "$MODEL_PATH"
    --vggt_model_path "$VGGT_MODEL_PATH"
    --data_root "$DATA_ROOT"
    --output_dir "$OUTPUT_DIR"
    --use_vggt_cache "$USE_CACHE"
    --vggt_cache_fallback "${VGGT_CACHE_FALLBACK:-online}"
    --vggt_preset "${VGGT_PRESET:-newjanusvln}"
    --max_history_images "${MAX_HISTORY_IMAGES:-8}"
    --vggt_fusion "${VGGT_FUSION:-default}"
    --bf16 true
    --per_device_train_batch_size "$PER_DEVICE_BATCH"
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --learning_rate "$LR"
    --num_train_epochs "$EPOCHS"
    --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0.0
    --activation_checkpointing true
    --dataloader_num_workers "$NUM_WORKERS" --dataloader_persistent_workers true
    --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 3
    --logging_steps 10 --report_to none
)
# Spec fields given here override the preset; unset ones keep it.
[[ -n "${VGGT_ATTENTION:-}" ]] && cmd+=(--vggt_attention "$VGGT_ATTENTION")
[[ -n "${VGGT_LAYERS:-}" ]] && cmd+=(--vggt_layers="$VGGT_LAYERS")
[[ -n "${VGGT_DTYPE:-}" ]] && cmd+=(--vggt_dtype "$VGGT_DTYPE")
[[ -n "${VGGT_REFERENCE_FRAME:-}" ]] && cmd+=(--vggt_reference_frame "$VGGT_REFERENCE_FRAME")
if [[ -n "${VGGT_SERVICE_URL:-}" ]]; then
    cmd+=(--vggt_service_url "$VGGT_SERVICE_URL")
fi
if [[ -n "${DEEPSPEED:-}" ]]; then
    cmd+=(--deepspeed "$DEEPSPEED")
fi
cmd+=("$@")

if [[ "$USE_CACHE" == true ]]; then
    echo "[INFO] VGGT feature cache enabled (loading from image directories)"
    echo "[INFO] VGGT feature service: ${VGGT_SERVICE_URL:-none (cache files only)}"
fi
echo "[INFO] node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} GPU(s) per node, master ${MASTER_ADDR}:${MASTER_PORT}"

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
cd "$REPO_DIR"
exec "${cmd[@]}"
