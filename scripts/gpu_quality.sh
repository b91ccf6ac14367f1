#!/usr/bin/env bash
# The best configs on one GPU: experiment=best (unconditional) and experiment=best_conditional trained
# together as a 2-job parallel sweep, then their test bits/dim, Fréchet distance, class accuracy, val
# curve (scripts/val_curve.py), weight average vs raw weights (scripts/ema_vs_raw.py) and sample grids.
#   bash scripts/gpu_quality.sh [MAX_TIME]    # DD:HH:MM:SS for each job; default: the configs' 8 minutes
# On the lent machine (the `device` tool), after `bash ../shared/device-prep.sh hydra-joblib-launcher` here:
#   run(command="bash scripts/gpu_quality.sh 00:00:08:00", carry=[".device"], timeout_s=600)
# Writes $OUT/summary.txt, $OUT/val_curve.png, $OUT/samples_*.png and $OUT/quality.tgz (logs, metrics, tb).
source "$(dirname "$0")/gpu_env.sh"
MAX_TIME=${1:-}
SWEEP=$WORK/quality
note "quality: 2-job sweep, max_time ${MAX_TIME:-from the configs}"
# The weight average is the lever tried here: the checkpoints then hold it and the raw weights, which
# scripts/ema_vs_raw.py scores side by side (keep model.ema_decay in conf/experiment/best.yaml only if it helps).
args=(-m hydra/launcher=parallel hydra.launcher.n_jobs=2 experiment=best,best_conditional model.ema_decay=0.999
      "hydra.sweep.dir=$SWEEP" "${DATA[@]}" "${SMOKE[@]}")
[ -n "$MAX_TIME" ] && args+=("trainer.max_time=$MAX_TIME")
[ "${GPU_SMOKE:-0}" = 1 ] && args+=(++model.channels=8 ++model.layers=2 quality_n=50 trainer.max_epochs=2)  # ++: keys of the swept experiments only
start=$(date +%s)
$PY train.py "${args[@]}" > "$WORK/quality.log" 2>&1
note "quality: sweep exit $? after $(( $(date +%s) - start )) s"
grep -a '^\[pixelcnn\]' "$WORK/quality.log" | grep -av 'resume with\|more epochs' | tail -20 | tee -a "$OUT/summary.txt"
cat "$SWEEP/summary.md" >> "$OUT/summary.txt" 2>/dev/null
runs=() labels=()
for name in best best_conditional; do
  dir=$(ls -d "$SWEEP"/*_experiment="$name" 2>/dev/null | head -1)
  [ -n "$dir" ] || { note "quality: no job dir for $name"; continue; }
  runs+=("$dir") labels+=(--label "$name")
  note "$name metrics: $(cat "$dir/metrics.json" 2>/dev/null | tr -d '\n ')"
  $PY scripts/ema_vs_raw.py "$dir" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
  label=(); [ "$name" = best_conditional ] && label=(label=all n=8)
  $PY sample.py "ckpt=\"$dir\"" "out=\"$WORK/samples_$name\"" "${label[@]}" > "$WORK/sample_$name.log" 2>&1 \
    && cp "$(ls "$WORK/samples_$name"/*.png | head -1)" "$OUT/samples_$name.png" \
    || { note "sample.py $name failed:"; tail -3 "$WORK/sample_$name.log" | tee -a "$OUT/summary.txt"; }
done
[ ${#runs[@]} -gt 0 ] && $PY scripts/val_curve.py "${runs[@]}" "${labels[@]}" --out "$OUT/val_curve.png" \
  > "$WORK/val_curve.txt" 2>&1; cat "$WORK/val_curve.txt" >> "$OUT/summary.txt"
tar czf "$OUT/quality.tgz" -C "$WORK" --exclude='*.ckpt' quality quality.log val_curve.txt 2>/dev/null
note "quality: done"
