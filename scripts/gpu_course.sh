#!/usr/bin/env bash
# The one-GPU course, measured in ONE device call of at most 540 s on a fresh H100 (no internet, the
# image's own torch and Triton): the numbers that decide how long the course takes, then every stage
# run on the GPU. Each part runs under its own time limit, and each command in a part under its own
# limit, capped by what the part has left; the parts' limits add up to 500 s, printed at the start.
# A part or stage that fails or runs out of time is logged and the next one runs.
#
# The call (device tool `run`), from the repository root; nothing needs carrying:
#     command:   bash scripts/gpu_course.sh
#     timeout_s: 540
# Then read, under the reply's files_at (the script writes them under $OUT as it goes, so a kill
# keeps what was done; 8 files, the most a call brings back):
#     summary.md      per part and per command: exit code (124 = its time limit), seconds, limit, peak
#                     GPU memory. Also summary.json, the same as JSON.
#     hotpaths.json   the per-unit times; then, here: python scripts/predict_gpu_course.py FILES_AT/hotpaths.json
#                     prints the predicted course time per stage with the device named
#     info.log        device, versions (and the optional parts' output, below)
#     hotpaths.log, tiny.log, slices.log   each part's full output, written as it runs
#     results.tar.gz  the stages' metrics.json and report.md, repacked after every part
#
#   bash scripts/gpu_course.sh --dry-run     # the plan and budgets, and the stages' flags checked by
#                                            # their own parsers; runs nothing on a GPU (CPU-safe)
#   bash scripts/gpu_course.sh PART ...      # some parts: info hotpaths tiny slices; optional (not in
#                                            # the default list): kernels (--check, --bench), compile
#                                            # (scripts/gpu_check.py), tune (scripts/tune_attention.py)
# Parts, in order:
#   info      the GPU, driver, torch, Triton and CUDA versions
#   hotpaths  scripts/gpu_hotpaths.py: SDPA's backend choice and time against the Triton kernel at the
#             course's head size (64); decode ms/step of the shared generate at batch 64, 256, 1,024,
#             eager and graphed (a CUDA graph per step over a static KV cache), both in bf16;
#             one eager training step at stage 01's micro-batch and at a chat stage's batch; one SAE
#             step of each dictionary stage 07's GPU preset trains
#   tiny      all eight stages at --preset tiny --device cuda, in order, each on the one before
#             (scripts/tiny_course.sh's chain; stages 06-08 had never run on CUDA)
#   slices    stages 01-07 at the GPU preset's model and batch sizes, each cut to a fixed small amount
#             of work by its own flags (01: 60 steps uncompiled; 03: 64 red-team prompts, 4 RL steps;
#             05: one rollout batch; 07: 100 SAE steps a dictionary ...), each on the one before: the
#             GPU preset's paths run, and their wall times check the prediction. Accuracies mean nothing.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs/gpu}
OUT=${OUT:-$RUNS/out}
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}; fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
declare -A BUDGET=([info]=30 [hotpaths]=80 [tiny]=130 [slices]=260 [kernels]=150 [compile]=100 [tune]=300)
DEFAULT=(info hotpaths tiny slices)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${DEFAULT[@]}")
total=0
for part in "${parts[@]}"; do
    [ -n "${BUDGET[$part]:-}" ] || { echo "unknown part $part (parts: ${!BUDGET[*]})"; exit 2; }
    total=$((total + BUDGET[$part]))
done
echo "gpu_course: parts ${parts[*]}; budgets $(for p in "${parts[@]}"; do printf '%s %ss, ' "$p" "${BUDGET[$p]}"; done)total ${total}s"
echo "  (call it with timeout_s >= $((total + 30)); RUNS=$RUNS, OUT=$OUT)"
[ $DRY = 1 ] || mkdir -p "$RUNS" "$OUT"
: "${PART:=}"; PART_END=0; PART_LOG=/dev/null

# summarize: $RUNS/steps.tsv -> $OUT/summary.md and $OUT/summary.json, after every command.
summarize() {
    $PY - "$RUNS/steps.tsv" "$OUT" <<'EOF' 2>/dev/null
import json, pathlib, sys
rows = [dict(zip(("part", "step", "rc", "seconds", "limit", "peak_gpu_mib"), line.split("\t")))
        for line in pathlib.Path(sys.argv[1]).read_text().splitlines() if line]
out = pathlib.Path(sys.argv[2])
(out / "summary.json").write_text(json.dumps(rows, indent=1))
md = ["| part | step | rc | seconds | limit | peak GPU MiB |", "|---|---|---|---|---|---|"]
md += [f"| {r['part']} | {r['step']} | {r['rc']} | {r['seconds']} | {r['limit']} | {r['peak_gpu_mib']} |" for r in rows]
(out / "summary.md").write_text("\n".join(md) + "\n\nrc 124: stopped at its limit; 125-137: killed\n")
EOF
}

# step NAME LIMIT COMMAND...: run under min(LIMIT, what the part has left), output appended to the
# part's log as it comes (and to the console), one row in the summary.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((PART_END - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ $DRY = 1 ]; then printf "  %-12s limit %4ss  %s\n" "$name" "$limit" "$*"; return 0; fi
    if [ "$limit" -le 2 ]; then
        printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$PART" "$name" skipped 0 "$limit" - >> "$RUNS/steps.tsv"; summarize
        echo "--- $name skipped: part $PART has no time left" | tee -a "$PART_LOG"; return 1
    fi
    echo "--- $name (limit ${limit}s, $(date -u +%H:%M:%S)): $*" | tee -a "$PART_LOG"
    local start=$SECONDS mem=$RUNS/$name.mem
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem" 2>/dev/null &
    local sampler=$!
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$PART_LOG"
    local rc=${PIPESTATUS[0]}
    kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
    local mib; mib=$(sort -n "$mem" 2>/dev/null | tail -1)
    printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$PART" "$name" "$rc" $((SECONDS - start)) "$limit" "${mib:--}" >> "$RUNS/steps.tsv"
    summarize
    echo "--- $name: rc $rc, $((SECONDS - start))s (limit ${limit}s), peak GPU memory ${mib:--} MiB" | tee -a "$PART_LOG"
    return "$rc"
}

part_info() {
    step nvidia_smi 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    step versions 20 $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())"
}

part_hotpaths() {
    step hotpaths 80 $PY scripts/gpu_hotpaths.py --json "$OUT/hotpaths.json"
}

TINY=(01_pretrain 02_sft 03_constitutional_ai 04_dpo 05_grpo_reasoning 06_character 07_sae_interp)
declare -A TINY_LIMIT=([01_pretrain]=25 [02_sft]=18 [03_constitutional_ai]=18 [04_dpo]=10
    [05_grpo_reasoning]=15 [06_character]=18 [07_sae_interp]=16 [08_welfare_eval]=10)
part_tiny() {   # scripts/tiny_course.sh's chain, a limit per stage
    local root=$RUNS/tiny previous="" stage
    for stage in "${TINY[@]}"; do
        local init=()
        [ -n "$previous" ] && init=(--init "$root/$previous")
        [ "$stage" = 07_sae_interp ] && init+=(--checkpoints "$root/02_sft")
        step "tiny_${stage:0:2}" "${TINY_LIMIT[$stage]}" $PY "$stage.py" --preset tiny --device cuda \
            --out "$root/$stage" "${init[@]}"
        previous=$stage
    done
    step tiny_08 "${TINY_LIMIT[08_welfare_eval]}" $PY 08_welfare_eval.py --preset tiny --device cuda \
        --out "$root/08_welfare_eval" --checkpoints $(for s in "${TINY[@]}"; do echo "$root/$s"; done)
}

# The GPU preset (the default on CUDA: no --preset given), each stage cut by its own flags to a fixed
# small amount of work. 02, 04 and 06 are here because each stage opens the one before's folder.
part_slices() {
    local r=$RUNS/slice
    step slice_01 45 $PY 01_pretrain.py --device cuda --out "$r/01" --steps 60 --eval_every 1000 \
        --save_every 100000 --probe_limit 200 --compile 0
    step slice_02 30 $PY 02_sft.py --device cuda --init "$r/01" --out "$r/02" --n_train 2000 --n_eval 8 \
        --skip_base_eval
    step slice_03 55 $PY 03_constitutional_ai.py --device cuda --init "$r/02" --out "$r/03" --n_red_team 64 \
        --n_helpful 64 --n_pairs 64 --rl_steps 4 --n_eval 16
    step slice_04 20 $PY 04_dpo.py --device cuda --init "$r/03" --out "$r/04" --steps 10
    step slice_05 40 $PY 05_grpo_reasoning.py --device cuda --init "$r/04" --out "$r/05" --sampled_tokens 60000 \
        --eval_problems 5 --pass_samples 4 --rehearsal 64
    step slice_06 30 $PY 06_character.py --device cuda --init "$r/05" --out "$r/06" --n_prompts 28 \
        --judge_prompts 14 --samples 2 --n_docs 300 --n_eval 8 --n_reveal 1 --anchor_requests 16
    step slice_07 40 $PY 07_sae_interp.py --device cuda --init "$r/06" --out "$r/07" --checkpoints "$r/02" \
        --n_docs 400 --n_chats 200 --sae_steps 100 --ce_rows 100 --steer_towns 2 --steer_prompts 6 \
        --concepts 8 --trials 1 --detect_steps 10 --rehearsal_prompts 64
}

part_kernels() {
    step check 45 $PY kernels.py --check
    step bench 100 $PY kernels.py --bench
}
part_compile() { step compile 100 $PY scripts/gpu_check.py; }
part_tune() { step tune 300 $PY scripts/tune_attention.py --head_dims 64 128; }

pack() {   # the stages' results, repacked after every part (not only at exit: a kill keeps them)
    local files=()
    for f in "$RUNS"/*/*/metrics.json "$RUNS"/*/*/report.md; do [ -f "$f" ] && files+=("$f"); done
    [ ${#files[@]} -gt 0 ] && tar czf "$OUT/results.tar.gz" "${files[@]}" 2>/dev/null
    return 0
}

# The flags of every stage command, checked by the stage's own parser on this machine (no run).
check_flags() {
    step() {
        shift 2
        [ "$1" = "$PY" ] && [[ "$2" == 0*.py ]] || return 0
        local file=$2; shift 2
        local said
        said=$($PY - "$file" "$@" 2>&1 <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("stage", sys.argv[1])
stage = sys.modules["stage"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
argv = sys.argv[2:]
argv[argv.index("--device") + 1] = "cpu"   # this machine has no GPU
stage.parse_args(argv if "--preset" in argv else argv + ["--preset", "gpu"])
print("parsed")
EOF
)
        if grep -q "unrecognized arguments\|error: argument" <<< "$said"; then
            echo "  FLAGS REJECTED: $file: $(grep -m1 'error' <<< "$said")"
        else
            echo "  $file: $(tail -n 1 <<< "$said" | cut -c1-120)"
        fi
    }
    part_tiny; part_slices
}

for part in "${parts[@]}"; do
    PART=$part PART_END=$((SECONDS + BUDGET[$part]))
    PART_LOG=$OUT/$part.log
    case $part in kernels|compile|tune) PART_LOG=$OUT/info.log ;; esac
    if [ $DRY = 1 ]; then echo "== $part (budget ${BUDGET[$part]}s)"; "part_$part"; continue; fi
    echo "=== $part (budget ${BUDGET[$part]}s, $(date -u +%H:%M:%S))" | tee -a "$PART_LOG"
    "part_$part"
    pack
done
if [ $DRY = 1 ] && [ "${CHECK_FLAGS:-1}" = 1 ]; then
    echo "== the stage commands' flags, through each stage's parser (errors about missing --init folders are expected)"
    check_flags
    exit 0
fi
[ $DRY = 1 ] && exit 0
echo "=== done in ${SECONDS}s; summary in $OUT/summary.md"
cat "$OUT/summary.md" 2>/dev/null
