#!/usr/bin/env bash
# adlab and the peer (anomalib 2.7 via ../shared/peer, same backbone and bundled weights) on the same data,
# one after the other on the same machine, 2 threads, 256 px. Prints both tables.
#   bash benchmarks/side_by_side.sh [CATEGORY_DIR]   (default ../shared/data/mpdd/metal_plate)
# Needs the peer's venv: (cd ../shared/peer && bash install.sh) — it is a yardstick, never a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mpdd/metal_plate}
CAT=$(basename "$DATA")
PEER=../shared/peer
OUT=${OUT:-/tmp/side_by_side}
mkdir -p "$OUT"
export OMP_NUM_THREADS=2 TQDM_DISABLE=1
python3 "$PEER/folder_view.py" "$DATA" "$OUT/peer_data/$CAT" >/dev/null
for m in patchcore padim; do
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /tmp/venv-anomalib/bin/python "$PEER/run_anomalib.py" \
    --model "$m" --category "$CAT" --data-root "$OUT/peer_data" --image-size 256 --threads 2 --coreset 0.1 \
    --out "$OUT/peer.jsonl" --workdir "$OUT/peer_runs" 2>/dev/null | grep '^RESULT' || true
done
ADLAB_CACHE="$OUT/cache" .venv/bin/adlab run "$DATA" --methods patchcore,padim,spade --image-size 256 \
  --out "$OUT/adlab_fast" 2>/dev/null
ADLAB_CACHE="$OUT/cache" .venv/bin/adlab run "$DATA" --methods patchcore --preset quality --image-size 256 \
  --out "$OUT/adlab_quality" 2>/dev/null
