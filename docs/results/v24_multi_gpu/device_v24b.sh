# v24b (2 x H200): the paper150m TNT LM's training step (loss + gradients, one sequence) with
# the sequence over 1 and 2 GPUs (context parallel, chain hand-off), XLA against the kernels.
set -x
timeout 560 python3 -m experiments.benchmark --mode=context --context_config=size=paper150m --context_lengths=32768 --context_devices=1,2 --context_implementations=xla,pallas --global_handoffs=chain --reps=3 --warmup=1 --profile=false --out=$OUT/v24b_context.jsonl 2>&1 | grep -v "^W1\|^I1" | grep -E "context|compiled|device|Error" | cut -c1-250 | tee $OUT/v24b_context.log
