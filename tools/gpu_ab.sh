#!/usr/bin/env bash
# A/B in one GPU run: bench a baseline tree (`tools/ab_tree.sh old HEAD~1` makes .ab/old; untracked,
# so the device tool carries it) and the current tree, and/or several layouts, interleaved, on the same
# synthetic models. Run-to-run spread across machines is up to ~5%; within one run it is well under 1%.
#   usage: OLD=.ab/old POLICY=f16 SHAPES="smollm2-135m llama-3.2-1b" ROUNDS=2 TOKENS=128 tools/gpu_ab.sh
#          OLD= LAYOUTS="fused separate" tools/gpu_ab.sh        (layouts of the current tree only)
#          OLD= POLICY="f16 bf16" tools/gpu_ab.sh                 (policies of the current tree, interleaved)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OLD=${OLD-.ab/old}; POLICY=${POLICY:-f16}; SHAPES=${SHAPES:-smollm2-135m llama-3.2-1b}; LAYOUTS=${LAYOUTS:-fused}
synth $SHAPES
run_log=$(mktemp)
for r in $(seq ${ROUNDS:-2}); do
  for tree in $OLD .; do
    for layout in $LAYOUTS; do
      for s in $SHAPES; do
        for pol in $POLICY; do
          echo "== round $r tree $tree $s $pol $layout ${TOKENS:-128} tokens"
          (cd "$tree" && PYTHONPATH=/tmp/site:$PWD cg bench --model $M/$s --policy $pol --layout $layout --tokens ${TOKENS:-128} 2>&1) |
            grep -v "packing\|it/s\|compiling\|uploaded"
        done
      done
    done
  done
done | tee "$run_log" | tee -a "$OUT/ab.log" | grep -E "==|graph replay"
echo "== summary: graph replay ms/token, one column per round (tree, shape, policy, layout)"
awk '/^== round/{key=$5"  "$6"  "$7"  "$8} /decode, graph replay/{ms[key]=ms[key]" "$4; if(!(key in seen)){order[++n]=key; seen[key]=1}}
     END{for(i=1;i<=n;i++) printf "  %-44s %s\n", order[i], ms[order[i]]}' "$run_log" | tee -a "$OUT/ab.log"
