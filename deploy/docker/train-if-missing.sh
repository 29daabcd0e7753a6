#!/bin/sh
# Compose step "stream-dec-train": write the first checkpoint when the checkpoint
# directory holds none, so `stream-dec run` can start; a no-op on every later start.
#
# It trains only when there is no ckpt-*.sdec file at all. A directory whose checkpoints
# are all unreadable is left alone on purpose: `stream-dec run` then stops with a message
# naming the problem, instead of a silent retrain handing out a new set of cluster ids.
#
# Settings (none starts with STREAM_DEC_, a prefix the service reserves for its own):
#   TRAIN_DATA        .npy/.npz file (default: the sample shipped in the package)
#   TRAIN_N_CLUSTERS  clusters to fit (default 24)
#   TRAIN_LIMIT       use only the first N rows, 0 = all (default 1200)
#   TRAIN_SEED        random seed (default 0)
set -eu

dir="${STREAM_DEC_CHECKPOINT__DIR:-./checkpoints}"
mkdir -p "$dir"
for f in "$dir"/ckpt-*.sdec; do
    if [ -e "$f" ]; then
        echo "stream-dec-train-if-missing: $dir already holds checkpoints (newest: $(ls "$dir"/ckpt-*.sdec | tail -n 1)); not training"
        exit 0
    fi
done

data="${TRAIN_DATA:-}"
if [ -z "$data" ]; then
    data="$(python -c 'from stream_dec.datasets import sample_path; print(sample_path())')"
fi
echo "stream-dec-train-if-missing: no checkpoint in $dir; training on $data"
exec stream-dec train \
    --data "$data" \
    --n-clusters "${TRAIN_N_CLUSTERS:-24}" \
    --limit "${TRAIN_LIMIT:-1200}" \
    --seed "${TRAIN_SEED:-0}" \
    --keep "${STREAM_DEC_CHECKPOINT__KEEP:-3}" \
    --checkpoint-dir "$dir" \
    --quiet
