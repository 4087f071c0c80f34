#!/usr/bin/env bash
# issue 14 probes: the demo recipe (DP-SGD, epsilon 8, SmolLM2, VADER) changing one thing
cd "$(dirname "$0")/.."
OUT=${1:-runs/i14}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
run() { name=$1; shift; args=(); for s in "$@"; do args+=(--set "$s"); done
  start=$(date +%s)
  .venv/bin/dplora-ray train configs/demo.yaml --out $OUT/$name --overwrite --no-progress "${args[@]}" > $OUT/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - start ))s $(.venv/bin/python -c "import json;s=json.load(open('$OUT/$name/summary.json'));print(s['eval_accuracy'], s['eval_f1_macro'], s['epsilon'], s['noise_multiplier'])" 2>/dev/null)" >> $OUT/results.txt
}
run ffa lora.train_a=false
run batch32 federation.batch_size=32 federation.local_steps=2 runtime.max_physical_batch_size=16
run clip01 privacy.clipping_norm=0.1
run fedavgm federation.server_optimizer=fedavgm federation.server_momentum=0.5
run ffa_batch32 lora.train_a=false federation.batch_size=32 federation.local_steps=2 runtime.max_physical_batch_size=16
run ffa_fedadam lora.train_a=false federation.server_optimizer=fedadam federation.server_learning_rate=0.001
run ffa_lr5e-3 lora.train_a=false federation.learning_rate=0.005
run ffa_all8_4steps lora.train_a=false federation.clients_per_round=8 federation.local_steps=4
run ffa_lr1e-2 lora.train_a=false federation.learning_rate=0.01
run ffa_lr5e-3_nodp lora.train_a=false federation.learning_rate=0.005 privacy.mode=none
echo done >> $OUT/results.txt
