# v20c: re-runs beside the walk with as many groups per step as fill the SMs alone (k = 2 for 12
# heads of 4-program clusters, 5 at hidden 128): the Titans mlp op at 32K, both reads, and hidden 128.
set -x
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --chunks=16 --lengths=32768 --passes=fwd+bwd --models=mlp"
timeout 200 $B --reads=cumulative --kernel_blocks=default --out=$OUT/v20c_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-200 | tee $OUT/v20c_mlp_32k.log
timeout 190 $B --reads=chunk_start --min_chunk_start_chunk=16 --kernel_blocks=default --out=$OUT/v20c_mlp_chunk_start.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-200 | tee $OUT/v20c_mlp_chunk_start.log
timeout 190 $B --reads=cumulative --expansion=2 --kernel_blocks=default --out=$OUT/v20c_mlp_e2.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-200 | tee $OUT/v20c_mlp_e2.log
