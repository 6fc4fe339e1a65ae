#!/usr/bin/env bash
# Old commit vs new, alternated back to back on this machine: saturated serving throughput
# (`remp bench layouts`, tp1pp1 and tp1pp2) and the light-load switch timings (`remp bench switch`).
#   scripts/ab_bench.sh OLD_REV NEW_REV OUT_DIR [ROUNDS]
# Each revision is checked out in a worktree of its own (under OUT_DIR) and run from there with this
# checkout's .venv; rounds alternate the order (old,new then new,old, ...). Summarise with
#   .venv/bin/python scripts/ab_summary.py OUT_DIR
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OLD_REV=$1 NEW_REV=$2 OUT=$(realpath -m "$3") ROUNDS=${4:-2}
PY=$PWD/.venv/bin/python
MODEL=${MODEL:-$("$PY" -c 'from remp.weights.bundled import bundled_model_dir; print(bundled_model_dir())' | tail -n 1)}
mkdir -p "$OUT"
for rev in "$OLD_REV" "$NEW_REV"; do
    [ -d "$OUT/tree-$rev" ] || git worktree add --detach "$OUT/tree-$rev" "$rev" >/dev/null
done
lscpu | grep -m1 'Model name' > "$OUT/cpu.txt"
for round in $(seq 1 "$ROUNDS"); do
    order=("$OLD_REV" "$NEW_REV")
    [ $((round % 2)) -eq 0 ] && order=("$NEW_REV" "$OLD_REV")
    for rev in "${order[@]}"; do
        echo "== round $round: $rev"
        (cd "$OUT/tree-$rev" && PYTHONPATH=$PWD "$PY" -m remp.cli bench layouts "$MODEL" --layouts tp1pp1,tp1pp2 \
            --rates inf --num-prompts 32 --input-len 128 --output-len 64 --hf-prompts 1 \
            --json "$OUT/serve-$rev-$round.json" > "$OUT/serve-$rev-$round.log" 2>&1) || true  # before f85e50b's successor, a bench exited 1 with its result
        [ -s "$OUT/serve-$rev-$round.json" ] || { echo "bench layouts failed: $OUT/serve-$rev-$round.log"; exit 1; }
        (cd "$OUT/tree-$rev" && PYTHONPATH=$PWD "$PY" -m remp.cli bench switch "$MODEL" --worker-pool-size 4 \
            --layouts tp1pp1,tp3pp1,tp1pp2 --load-rate 0.25 --input-len 64 --output-len 64 \
            --json "$OUT/switch-$rev-$round.json" > "$OUT/switch-$rev-$round.log" 2>&1) || true
        [ -s "$OUT/switch-$rev-$round.json" ] || { echo "bench switch failed: $OUT/switch-$rev-$round.log"; exit 1; }
    done
done
