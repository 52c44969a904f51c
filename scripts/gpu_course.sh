#!/usr/bin/env bash
# The course on one CUDA GPU, measured: kernels, torch.compile, and every stage at a tenth of its
# GPU preset, each part under its own time limit, so that the whole fits a short lease.
#
#   bash scripts/gpu_course.sh                      # every part, in order
#   bash scripts/gpu_course.sh kernels compile      # some parts: info kernels compile pretrain chain moe tune
#
# Parts:
#   info      the GPU, driver and versions
#   kernels   python kernels.py --check, then --bench (TFLOP/s against SDPA and a per-expert loop)
#   compile   python scripts/gpu_check.py: the machine's ceilings; torch.compile through the kernels
#   pretrain  stage 01's GPU preset for a tenth of its steps (420 of 4181): tokens/s, MFU, memory
#   chain     stages 02-05 at a tenth of their GPU presets (03 at a twentieth), each on the previous one's
#             output (on stage 01 from `pretrain` if it is there, else a 60-step uncompiled stage 01)
#   moe       (not in the default list) the compile check for the Mixture-of-Experts model
#   tune      (not in the default list) scripts/tune_attention.py: the attention tiles at D = 128 timed
# Runs and logs go to $RUNS (default runs/gpu): each part's log, and times.txt with its wall time,
# exit code and peak GPU memory; at the end the logs and the stages' metrics.json and report.md are
# packed into $OUT/results.tar.gz (default $RUNS). The stages' tenth-size results measure speed and
# check that the GPU path runs; their accuracies are not the GPU preset's.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs/gpu}
LOGS=$RUNS/logs
OUT=${OUT:-$RUNS}
mkdir -p "$LOGS" "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15

# run NAME LIMIT_S COMMAND...: the command under a time limit, its log in $LOGS/NAME.log, and one line
# in $LOGS/times.txt: exit code, wall seconds, the most GPU memory nvidia-smi saw in use meanwhile.
run() {
    local name=$1 limit=$2; shift 2
    local start=$SECONDS peak=$LOGS/$name.mem
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$peak" 2>/dev/null &
    local sampler=$!
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
    local mib; mib=$(sort -n "$peak" | tail -1)
    printf "%-10s rc %3s  %5ss (limit %ss)  peak GPU memory %s MiB\n" "$name" $rc $((SECONDS - start)) \
        "$limit" "${mib:--}" | tee -a "$LOGS/times.txt"
    # the log's end, each progress bar's last state only
    tr '\r' '\n' < "$LOGS/$name.log" | grep -v '^\s*$' | grep -v '%|' | tail -n 16 | cut -c1-160
    return $rc
}

part_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
}

part_kernels() {
    run check 45 $PY kernels.py --check
    run bench 90 $PY kernels.py --bench
}

part_compile() {
    run compile 100 $PY scripts/gpu_check.py
}

part_moe() {
    run compile_moe 100 $PY scripts/gpu_check.py --n_experts 8 --batch 16
}

part_pretrain() {
    run stage01 170 $PY 01_pretrain.py --out "$RUNS/01" --steps 420 --eval_every 210 --save_every 100000
}

part_chain() {
    if [ ! -f "$RUNS/01/model.pt" ]; then
        run stage01s 50 $PY 01_pretrain.py --out "$RUNS/01" --steps 60 --eval_every 1000 --save_every 100000 \
            --probe_limit 200 --compile 0 || return
    fi
    run stage02 100 $PY 02_sft.py --init "$RUNS/01" --out "$RUNS/02" --n_train 20000 --n_eval 50 --skip_base_eval --compile 0 \
        || return
    # Stage 03 at a twentieth: at a tenth its generation alone outran 90 s on an H200 (2026-11-30).
    run stage03 140 $PY 03_constitutional_ai.py --init "$RUNS/02" --out "$RUNS/03" --n_red_team 400 \
        --n_helpful 600 --n_pairs 400 --rl_steps 20 --n_eval 30 || return
    run stage04 45 $PY 04_dpo.py --init "$RUNS/03" --out "$RUNS/04" || return
    run stage05 75 $PY 05_grpo_reasoning.py --init "$RUNS/04" --out "$RUNS/05" --sampled_tokens 800000 \
        --eval_problems 10 --pass_samples 16
}

part_tune() {
    run tune 120 $PY scripts/tune_attention.py --head_dims 128
}

pack() {
    local files=("$LOGS"/*.log "$LOGS"/times.txt)
    for f in "$RUNS"/0*/metrics.json "$RUNS"/0*/report.md; do [ -f "$f" ] && files+=("$f"); done
    tar czf "$OUT/results.tar.gz" "${files[@]}" 2>/dev/null
}
trap pack EXIT

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(info kernels compile pretrain chain)
for part in "${parts[@]}"; do
    echo "=== $part ($(date -u +%H:%M:%S))"
    "part_$part"
done
echo "=== times"
cat "$LOGS/times.txt"
