# v22c: compile time and step time of the Titans mlp op (hidden 256) at one and two steps a
# turn, and the hidden-128 op with the default blocks (v21 + v22).
set -x
B="--mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd --models=mlp --kernel_tnt=false --attention=false --chunks=16 --lengths=32768 --reads=cumulative --kernel_blocks=default"
timeout 195 python3 bench_unroll.py 2 $B --out=$OUT/v22c_unroll2.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -2 | cut -c1-220 | tee $OUT/v22c_unroll2.log
timeout 195 python3 bench_unroll.py 1 $B --out=$OUT/v22c_unroll1.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -2 | cut -c1-220 | tee $OUT/v22c_unroll1.log
timeout 195 python3 -m experiments.benchmark $B --expansion=2 --out=$OUT/v22c_mlp_e2.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -2 | cut -c1-220 | tee $OUT/v22c_mlp_e2.log
