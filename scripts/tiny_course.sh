#!/usr/bin/env bash
# All eight stages in order at --preset tiny, each on the folder the one before wrote: the smoke test
# of the whole course (about two minutes on 2 CPU cores). Usage: bash scripts/tiny_course.sh [ROOT]
# (default runs/tiny). Any extra arguments after ROOT go to every stage (e.g. --seed 7).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-runs/tiny}
shift || true
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
stages=(01_pretrain 02_sft 03_constitutional_ai 04_dpo 05_grpo_reasoning 06_character 07_sae_interp)
previous=""
for stage in "${stages[@]}"; do
    echo "== $stage"
    init=()
    [ -n "$previous" ] && init=(--init "$root/$previous")
    # Stage 07 injects thoughts into the SFT model too, as the course's own run does.
    [ "$stage" = 07_sae_interp ] && init+=(--checkpoints "$root/02_sft")
    "$py" "$stage.py" --preset tiny --out "$root/$stage" "${init[@]}" "$@"
    previous=$stage
done
echo "== 08_welfare_eval"
"$py" 08_welfare_eval.py --preset tiny --out "$root/08_welfare_eval" "$@" \
    --checkpoints $(for s in "${stages[@]}"; do echo "$root/$s"; done)
echo "the tiny course is in $root/"
