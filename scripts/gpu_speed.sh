#!/usr/bin/env bash
# Training and sweep speed of the seed model on one GPU, each part the command a user would run:
#  1. python bench.py: the Lightning loop (automatic optimization, one optimizer step per batch) vs a plain loop;
#  2. python train.py with the seed defaults for a capped trainer.max_time: epochs reached, s/epoch;
#  3. a 4-job sweep of 3 epochs (seed=0..3), serial, then hydra/launcher=parallel with n_jobs=4;
#  4. a check that experiment=best trains here (a few batches), which also fills the compile cache.
#   DEADLINE=$(( $(date +%s) + 420 )) bash scripts/gpu_speed.sh   # parts that cannot end by then are skipped
# On the lent machine (the `device` tool), after `bash ../shared/device-prep.sh hydra-joblib-launcher` here:
#   run(command="DEADLINE=$(( $(date +%s) + 420 )) bash scripts/gpu_speed.sh", carry=[".device"], timeout_s=480)
# Writes $OUT/summary.txt and $OUT/speed.tgz (bench JSON, logs, metrics). Part 3 skips the end-of-run sample
# quality (quality_n=0) so that both sweeps time the training; the data and compile caches are warm for both.
source "$(dirname "$0")/gpu_env.sh"
BENCH=(bench.repeats=2 "${DATA[@]}")
SWEEP=(seed=0,1,2,3 trainer.max_epochs=3 quality_n=0 "${DATA[@]}")
TINY=()
if [ "${GPU_SMOKE:-0}" = 1 ]; then
  BENCH+=(model.filters=8 model.residual_blocks=1 bench.train_batches=4 bench.warmup_batches=1 bench.epoch=estimate bench.sample_sizes=[8])
  TINY=(model.filters=8 model.residual_blocks=1 "${SMOKE[@]}")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/summary.txt" 2>/dev/null
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/summary.txt"

bench() {  # $1: name; the rest: overrides
  local name=$1; shift
  note "speed 1: bench.py $*"
  timeout 200 $PY bench.py "${BENCH[@]}" "$@" bench.out="$WORK/bench_$name.json" > "$WORK/bench_$name.log" 2>&1
  echo "bench_$name: exit $?" | tee -a "$OUT/summary.txt"
  grep -a '^|\|^device' "$WORK/bench_$name.log" | tee -a "$OUT/summary.txt" || tail -5 "$WORK/bench_$name.log" | tee -a "$OUT/summary.txt"
}
LONG=(bench.warmup_batches=80 bench.train_batches=320)  # a few seconds of steps timed, past the compilation
[ "${GPU_SMOKE:-0}" = 1 ] && LONG=()
need 150 && bench seed "${LONG[@]}"

# 2. The seed defaults (150 epochs) for 40 s of training.
if need 90; then
  note "speed 2: train.py seed defaults, trainer.max_time=40 s"
  timeout 150 $PY train.py trainer.max_time=00:00:00:40 quality_n=0 "${DATA[@]}" "${TINY[@]}" \
    "hydra.run.dir=$WORK/seed_defaults" > "$WORK/seed_defaults.log" 2>&1
  echo "seed_defaults: exit $?, metrics $(tr -d '\n ' < "$WORK/seed_defaults/metrics.json" 2>/dev/null)" | tee -a "$OUT/summary.txt"
  grep -ao 'epoch 1 incl. validation.*' "$WORK/seed_defaults.log" | head -2 | tee -a "$OUT/summary.txt"
fi

for launcher in serial parallel; do
  extra=(); [ $launcher = parallel ] && extra=(hydra/launcher=parallel hydra.launcher.n_jobs=4)
  need $([ $launcher = serial ] && echo 220 || echo 100) || continue
  note "speed 3: 4-job sweep, $launcher"
  start=$(date +%s.%N)
  timeout 280 $PY train.py -m "${SWEEP[@]}" "${TINY[@]}" "${extra[@]}" "hydra.sweep.dir=$WORK/sweep_$launcher" \
    > "$WORK/sweep_$launcher.log" 2>&1
  status=$?
  echo "sweep_$launcher: exit $status, wall $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$OUT/summary.txt"
  for m in "$WORK/sweep_$launcher"/*/metrics.json; do echo "  $m: $(tr -d '\n ' < "$m")"; done | tee -a "$OUT/summary.txt"
done

# 4. experiment=best for a few batches (the new weight average on CUDA, compiled), before its long run.
if need 60; then
  note "speed 4: experiment=best check"
  CHECK=(experiment=best trainer.max_epochs=1 trainer.limit_train_batches=40 trainer.limit_val_batches=2
         trainer.limit_test_batches=2 quality_n=0 "${DATA[@]}" "hydra.run.dir=$WORK/best_check")
  [ "${GPU_SMOKE:-0}" = 1 ] && CHECK+=(model.channels=8 model.layers=2)
  timeout 120 $PY train.py "${CHECK[@]}" > "$WORK/best_check.log" 2>&1
  echo "best_check: exit $?" | tee -a "$OUT/summary.txt"
  grep -a '^\[pixelcnn\]\|Error\|error' "$WORK/best_check.log" | tail -4 | tee -a "$OUT/summary.txt"
fi
tar czf "$OUT/speed.tgz" -C "$WORK" --exclude='*.ckpt' $(cd "$WORK" && ls -d bench_* sweep_* seed_defaults* best_check* 2>/dev/null)
note "speed: done"
