# Sourced by scripts/gpu_speed.sh and scripts/gpu_quality.sh: the environment of a run on a lent GPU
# machine (the `device` tool), from the project root. That machine has torch, lightning, tensorboard,
# matplotlib and joblib but no hydra and no dataset: `bash ../shared/device-prep.sh hydra-joblib-launcher`
# puts the wheels and Fashion-MNIST into .device/ here, and the run carries it (carry [".device"]).
# GPU_SMOKE=1 runs the same steps on this CPU with tiny sizes (a check of the scripts, not a measurement).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-/tmp/gpu-work}  # run dirs, logs; only a summary and a tarball go to $OUT (it returns 8 files at most)
mkdir -p "$OUT" "$WORK"
if ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
export PIXELCNN_DATA_DIR=$WORK/data  # the preprocessed cache and the classifier of the quality metrics
PY=${PY:-python3}
DATA=("data.system_dir=$PWD/.device/fashion-mnist" "data.download=false")
[ -f .device/fashion-mnist/train-images-idx3-ubyte.gz ] || DATA=()  # here: the system dir of conf/data
SMOKE=()
if [ "${GPU_SMOKE:-0}" = 1 ]; then
  SMOKE=(trainer.limit_train_batches=4 trainer.limit_val_batches=2 trainer.limit_test_batches=2)
fi
# Seconds left before $DEADLINE (epoch seconds), for parts that size themselves to the time left.
left() { echo $(( ${DEADLINE:-$(( $(date +%s) + 100000 ))} - $(date +%s) )); }
# Whether a part that needs $1 seconds can still end before $DEADLINE (else it says so and is skipped).
need() { [ "$(left)" -ge "$1" ] || { note "skipped: needs $1 s"; return 1; }; }
note() { echo "[gpu $(date +%H:%M:%S), $(left) s left] $*" | tee -a "$OUT/summary.txt"; }
