#!/usr/bin/env bash
# What ran on the lent GPU (one call of about nine minutes; results/gpu/README.md has the figures):
#   0. CUDA MPS, if a client answers through it (else fewer grid runs at a time)
#   1. smoke: run.py --preset tiny and a one-row claims grid on CUDA, beside each seed's frozen DDPM and factor
#      classifier for the claims grid; any failure stops everything at once (device time is scarce)
#   2. the claims grid (issue 12): every row x seeds 0-2 at the claims budget, JOBS processes side by side on the
#      one GPU (they share claims.json under a lock), the rows that matter most first, stopped at GRID_END s
#   3. bench.py on the quiet GPU (claims and celeba64 presets, fp32 and bf16, channels_last)
#   4. the celeba64 preset's real training loop (train.py dm then diti, built-in data at 64 px) for a few hundred steps
# Everything lands in $OUT/gpu.tar.gz. The whole grid alone in one call (estimated ten minutes with MPS):
#   GRID_END=570 BENCH_PRESETS= C64_STEPS=0 bash results/gpu/run_gpu.sh
# PREP=<folder> starts the grid's folder from a copy of one made beforehand (each seed's DDPM and factor
# classifier trained on a CPU, the claims.json of the runs already done): what it holds is not trained again.
# The second call (the grid's missing rows, the DDPMs carried in runs/gpu_prep/claims):
#   PREP=runs/gpu_prep/claims ROWS="stop_grad-uniform-k4 stop_grad-fitted-k4 base-uniform-k4 base-fitted-k4 disdiff" \
#   GRID_END=400 END=530 BENCH_PRESETS=celeba64 C64_STEPS=300 bash results/gpu/run_gpu.sh
# CLAIMS_ARGS: more claims.py flags for the grid; its data and DDPM flags reach phase 1's DDPMs and classifiers.
# The grid at 32 px, where E reads every factor when told the labels (at 16 px the size stops at 0.80):
#   CLAIMS_ARGS="--image-size 32 --fine-loss-time 140" GRID_END=570 BENCH_PRESETS= C64_STEPS=0 bash results/gpu/run_gpu.sh
# Knobs (environment) let the same script run in minutes on a CPU:
#   PRESET=tiny SEEDS=0 JOBS=2 DEVICE=cpu GRID_END=200 END=400 BENCH_PRESETS=tiny C64_STEPS=0 bash results/gpu/run_gpu.sh
set -u
OUT=${OUT:-/tmp/gpu_out}; W=${WORK:-/tmp/gpu_work}; G=$W/claims
PRESET=${PRESET:-claims}; SEEDS=${SEEDS:-0 1 2}; JOBS=${JOBS:-16}; DEVICE=${DEVICE:-cuda}
GRID_END=${GRID_END:-420}; END=${END:-575}; BENCH_PRESETS=${BENCH_PRESETS-claims,celeba64}; C64_STEPS=${C64_STEPS:-100}
PRECISION=${PRECISION:-fp32}     # the grid's training precision: as on the CPU runs (auto would be bf16 on CUDA)
ROWS=${ROWS:-stop_grad-uniform-k8 stop_grad-fitted-k8 base-uniform-k8 base-fitted-k8 pdae disdiff stop_grad-uniform-k4 stop_grad-fitted-k4 base-uniform-k4 base-fitted-k4}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
PREP=${PREP:-}
CLAIMS_ARGS=${CLAIMS_ARGS:-}
DM_FLAGS=$($PY -c "import claims; print(' '.join(claims.overrides_of(claims.parser().parse_args('$CLAIMS_ARGS'.split()))['dm']))") \
    || { echo "CLAIMS_ARGS: not claims.py flags: $CLAIMS_ARGS"; exit 1; }
mkdir -p "$OUT" "$W/logs" "$G"
[ -n "$PREP" ] && cp -r "$PREP"/. "$G"/
t0=$(date +%s)
now() { echo $(( $(date +%s) - t0 )); }
say() { echo "[$(now) s] $*" | tee -a "$W/timeline.txt"; }
pack() {
    say "packing"
    cp "$W/timeline.txt" "$OUT/" 2>/dev/null
    tar -czf "$OUT/gpu.tar.gz" --exclude='*.pt' --exclude='*.tmp' --exclude=log.json -C "$W" . 2>/dev/null
    (cd "$W" && find . -name log.json | tar -czf "$OUT/logs_json.tar.gz" -T - 2>/dev/null)
    ls -la "$OUT"
}
{ nvidia-smi; $PY -c "import torch, os; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(), os.cpu_count())"; } >"$W/env.txt" 2>&1
cat "$W/env.txt"

# 0. CUDA MPS lets the grid's small processes run their kernels side by side; kept only if a client answers ------
MPS=off
if [ "$DEVICE" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    if nvidia-cuda-mps-control -d && timeout 40 $PY -c "import torch; print((torch.ones(1, device='cuda') + 1).item())"; then
        MPS=on
    else
        echo quit | timeout 10 nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
fi
[ "$MPS" = off ] && [ "$DEVICE" = cuda ] && JOBS=${JOBS_NO_MPS:-9}
say "MPS $MPS, $JOBS grid runs at a time"

# 1. smoke beside the grid's DDPMs and classifiers -------------------------------------------------------------
say "phase 1: smoke, DDPM and classifier per seed"
$PY run.py --preset tiny --out "$W/smoke" --device "$DEVICE" >"$W/logs/smoke_run.log" 2>&1 & smoke=$!
$PY claims.py --preset tiny --out "$W/smoke_claims" --seeds 0 --rows stop_grad-fitted-k4 --threads 1 \
    >"$W/logs/smoke_claims.log" 2>&1 & smoke2=$!
prep=()
for s in $SEEDS; do
    [ -f "$G/seed$s/dm/ckpt.pt" ] || { $PY train.py dm --preset "$PRESET" $DM_FLAGS --seed "$s" --out "$G/seed$s/dm" --device "$DEVICE" --precision "$PRECISION" \
        >"$W/logs/dm_s$s.log" 2>&1 &
    prep+=($!); }
    OMP_NUM_THREADS=2 $PY -c "
import dataclasses, os, claims, config
dm, _, _ = config.make_config('dm', ['--preset', '$PRESET', *'$DM_FLAGS'.split()])
claims.shared_classifier('$G/seed$s', config.eval_config('$PRESET', seed=$s), dataclasses.replace(dm, seed=$s))
" >"$W/logs/classifier_s$s.log" 2>&1 &       # needed at the first evaluation only: not waited for
done
for p in $smoke $smoke2; do
    if ! wait $p; then
        say "SMOKE FAILED: stopping"; tail -30 "$W"/logs/smoke_*.log; kill ${prep[@]+"${prep[@]}"} 2>/dev/null; pack; exit 1
    fi
done
say "smoke passed"
for p in ${prep[@]+"${prep[@]}"}; do wait $p || { say "a DDPM failed"; tail -30 "$W"/logs/dm_s*.log; pack; exit 1; }; done
say "DDPMs done ($(ls "$G"/seed*/dm/ckpt.pt 2>/dev/null | wc -l) of them)"

# 2. the grid: JOBS runs at a time, stopped at GRID_END ---------------------------------------------------------
say "phase 2: claims grid, $JOBS at a time"
for r in $ROWS; do for s in $SEEDS; do echo "$s $r"; done; done >"$W/jobs.txt"
setsid bash -c "xargs -P $JOBS -L 1 bash -c '$PY claims.py --out $G --preset $PRESET --seeds \$0 --rows \$1 $CLAIMS_ARGS --precision $PRECISION --threads 1 >$W/logs/s\$0_\$1.log 2>&1' <$W/jobs.txt" &
grid=$!
while kill -0 $grid 2>/dev/null && [ "$(now)" -lt "$GRID_END" ]; do sleep 5; done
if kill -0 $grid 2>/dev/null; then say "grid stopped at GRID_END"; kill -- -$grid 2>/dev/null; sleep 3; fi
say "grid: $(grep -c '"row"' $G/claims.json 2>/dev/null) runs in claims.json"
pkill -f "claims.py --out $G --"; sleep 1      # this grid's only: never another claims.py on the machine
if [ "$MPS" = on ]; then echo quit | timeout 10 nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY; sleep 2; fi
for f in "$W"/logs/s*_*.log; do printf '%s: %s\n' "$(basename $f)" "$(tail -c 300 $f | tr '\r' '\n' | grep -v '^ *$' | tail -1)"; done \
    >"$W/grid_tails.txt"; cat "$W/grid_tails.txt"

# 3. bench on the quiet GPU (BENCH_PRESETS= skips it) ------------------------------------------------------------
if [ -n "$BENCH_PRESETS" ]; then
    say "phase 3: bench"
    timeout $(( (END - $(now)) * 3 / 4 )) $PY bench.py --presets "$BENCH_PRESETS" --device "$DEVICE" --precision fp32,bf16 \
        --channels-last --warmup 1 --iters 3 --ddim-iters 2 --ddim-steps 10 --json "$W/bench.json" >"$W/logs/bench.log" 2>&1
    say "bench rc $?"; tail -25 "$W/logs/bench.log"
fi

# 4. the celeba64 preset's training loop on the built-in data at 64 px ------------------------------------------
if [ "$C64_STEPS" -gt 0 ] && [ $(( END - $(now) )) -gt 40 ]; then
    say "phase 4: celeba64 loop"
    left=$(( END - $(now) ))
    timeout $(( left / 2 )) $PY train.py dm --preset celeba64 --data synthetic --steps "$C64_STEPS" --ckpt-every "$C64_STEPS" \
        --sample-steps 10 --out "$W/c64/dm" --device "$DEVICE" >"$W/logs/c64_dm.log" 2>&1
    say "celeba64 dm rc $?"
    timeout $(( END - $(now) )) $PY train.py diti --preset celeba64 --dm "$W/c64/dm/ckpt.pt" --steps "$C64_STEPS" \
        --ckpt-every "$C64_STEPS" --out "$W/c64/diti" --device "$DEVICE" >"$W/logs/c64_diti.log" 2>&1
    say "celeba64 diti rc $?"
fi
pack
