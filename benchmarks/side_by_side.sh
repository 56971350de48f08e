#!/usr/bin/env bash
# adlab and the peer (anomalib 2.7 via ../shared/peer, same backbone and bundled weights) on the same data, one
# after the other on the same machine, method by method with matched training steps (benchmarks/peer_parity.py).
#   bash benchmarks/side_by_side.sh [CATEGORY_DIR ...]   (default: the sample data, mpdd/metal_plate, magnetic_tile/mt)
#   METHODS=patchcore,padim bash benchmarks/side_by_side.sh ../shared/data/mpdd/metal_plate
# Needs the peer's venv: (cd ../shared/peer && bash install.sh) — it is a yardstick, never a dependency.
# Every method anomalib ships that runs offline with the bundled weights: PatchCore, PaDiM, STFPM, FastFlow,
# CFlow, DRAEM (its anomaly source: scikit-image photographs, as adlab's), GANomaly. Expect hours on 2 cores for
# all of them on magnetic_tile (anomalib's PatchCore coreset there did not finish in 45 min).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
  set -- sample_data/brick sample_data/grass sample_data/gravel ../shared/data/mpdd/metal_plate ../shared/data/magnetic_tile/mt
fi
export OMP_NUM_THREADS=2 TQDM_DISABLE=1
.venv/bin/python benchmarks/peer_parity.py "$@" --methods "${METHODS:-patchcore,padim,stfpm,fastflow,cflow,draem,ganomaly}" \
  --out "${OUT:-/tmp/side_by_side}"
