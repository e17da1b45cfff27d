# Layer mode with the fused kernel beside XLA: whole TNT and Titans layers (d_model 768, 12 x 64,
# mlp memories hidden 256), fwd+bwd, 32K tokens per step, C = 16, T = 2K and 32K.
set -x
timeout 560 python3 -m experiments.benchmark --mode=layer --kinds=tnt,titans --lengths=2048,32768 \
  --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 \
  --layer_implementations=xla,pallas --out=$OUT/layer_v17.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -16 | tee $OUT/layer_v17.log
