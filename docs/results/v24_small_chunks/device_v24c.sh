# v24c (H100): chunks below 16 (padded to 16 on the GPU kernels): the Titans mlp op (hidden 256)
# at C = 1, 4, 8 on one 8K sequence, XLA against the kernels (fwd+bwd).
set -x
B="--mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd --kernel_tnt=false --attention=false"
timeout 570 python3 -m experiments.benchmark $B --models=mlp --reads=cumulative --chunks=8,4,1 --lengths=8192 --out=$OUT/v24c_mlp_small.jsonl 2>&1 | grep -v "^W1\|^I1" | grep -E "tok/s|Error|device" | cut -c1-250 | tee $OUT/v24c_mlp_small.log
