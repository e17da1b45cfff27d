# v24d (H100): a whole TNT memory of mlp memories with local chunks below 16: the paper's {8} at
# 32K and stage 2's {1} at 8K, XLA against the kernels (fwd+bwd), attention beside.
set -x
B="--mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd --models= --kernel_tnt=true"
timeout 300 python3 -m experiments.benchmark $B --kernel_local_chunk=8 --lengths=32768 --attention=true --out=$OUT/v24d_tnt_local8.jsonl 2>&1 | grep -v "^W1\|^I1" | grep -E "tok/s|Error|device" | cut -c1-250 | tee $OUT/v24d_tnt_local8.log
timeout 270 python3 -m experiments.benchmark $B --kernel_local_chunk=1 --lengths=8192 --attention=false --out=$OUT/v24d_tnt_local1.jsonl 2>&1 | grep -v "^W1\|^I1" | grep -E "tok/s|Error|device" | cut -c1-250 | tee $OUT/v24d_tnt_local1.log
