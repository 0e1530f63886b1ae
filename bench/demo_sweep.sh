#!/usr/bin/env bash
# Sweep of demo-preset variants: every variant trains concurrently (meant for a GPU, where a tiny net leaves room for
# many processes), stops at DUR Mimg or after TRAIN_LIMIT seconds (SIGTERM: snapshot and exit), then every snapshot
# is scored with `fid.py demo` (coherence of 256 samples, held-out loss) and its first 64 samples saved as a grid.
# Results: $OUT/results.jsonl (one line per snapshot) and $OUT/grids.tgz. Run from the repository root:
#   OUT=bench-out/demo-sweep DEV=cuda bash bench/demo_sweep.sh
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
DEV=${DEV:-cuda}; DUR=${DUR:-0.16}; TRAIN_LIMIT=${TRAIN_LIMIT:-330}; OUT=${OUT:-bench-out/demo-sweep}; PYTHON=${PYTHON:-python3}
OUT=$(realpath -m "$OUT"); W=$(mktemp -d); mkdir -p "$OUT"
declare -A C=(
  [base]="" [lr4]="--lr=0.004" [lr2]="--lr=0.002" [b32]="--batch=32" [b64lr4]="--batch=64 --lr=0.004" [noattn]="--attn=64"
  [c64]="--cbase=64" [deep]="--cres=1,2,2,2" [p1]="--real_p=1.0" [p75]="--real_p=0.75" [full]="--patch=off"
  [ema5]="--ema=0.005" [blocks2]="--blocks=2"
)
$PYTHON dataset_tool.py --source=demo:shapes --dest="$W/shapes.zip" --resolution=32x32 > "$W/ds.log" 2>&1 || { cat "$W/ds.log"; exit 1; }
for name in "${!C[@]}"; do
  timeout -s TERM "$TRAIN_LIMIT" $PYTHON train.py --preset=demo --device="$DEV" --data="$W/shapes.zip" --outdir="$W/$name" \
    --nosubdir --duration="$DUR" --tick=10 --snap=4 --dump=100000 --preview=False ${C[$name]} > "$W/$name.log" 2>&1 &
done
wait
for name in "${!C[@]}"; do
  ( for snap in "$W/$name"/network-snapshot-*.pkl; do
      $PYTHON fid.py demo --network="$snap" --device="$DEV" --steps=32 --json="$W/$name.jsonl" --grid="${snap%.pkl}.png" > /dev/null 2>&1
    done ) &
done
wait
for name in "${!C[@]}"; do sed "s/^/{\"config\": \"$name\", \"r\": /; s/\$/}/" "$W/$name.jsonl"; done > "$OUT/results.jsonl"
(cd "$W" && tar czf "$OUT/grids.tgz" */network-snapshot-*.png ./*.log)
rm -rf "$W"
echo "Wrote $OUT/results.jsonl and $OUT/grids.tgz"
