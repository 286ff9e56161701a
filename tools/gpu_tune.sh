#!/usr/bin/env bash
# Sweep one device-spec tuning knob on the GPU: for each value, rebuild the target with it and bench
# both synthetic shapes. The spec edit stays on the device machine's copy of the tree.
#   usage: KNOB=gemv_loads VALUES="4 8 16" DEVICE=h200 POLICY=f16 tools/gpu_tune.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
KNOB=${KNOB:-gemv_loads}; DEVICE=${DEVICE:-h200}; POLICY=${POLICY:-f16}
synth ${SHAPES:-smollm2-135m llama-3.2-1b}
cp specs/devices/$DEVICE.yaml /tmp/device.yaml.orig
for v in ${VALUES:-4 8 16}; do
  sed -i "s/^  $KNOB: .*/  $KNOB: $v/" specs/devices/$DEVICE.yaml
  cg build --device $DEVICE --policy $POLICY --layout fused >/dev/null
  for s in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
    echo "== $KNOB=$v $s $POLICY"
    cg bench --model $M/$s --device $DEVICE --policy $POLICY --layout fused 2>&1 | grep -v "packing\|it/s\|compiling\|uploaded"
  done
done 2>&1 | tee -a "$OUT/tune.log"
cp /tmp/device.yaml.orig specs/devices/$DEVICE.yaml; cg build --device $DEVICE --policy $POLICY --layout fused >/dev/null
