# v20b: v20a's default (re-runs beside the walk) rows were cut by the step's time limit while
# compiling: the Titans mlp op at 32K with the default blocks alone, timed, with compile logs.
set -x
date +%T
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --chunks=16 --lengths=32768 --passes=fwd+bwd --models=mlp"
JAX_LOG_COMPILES=1 timeout 450 $B --reads=cumulative --kernel_blocks=default --out=$OUT/v20b_mlp_32k.jsonl > $OUT/v20b_raw.log 2>&1
date +%T
grep -v "^W1\|^I1" $OUT/v20b_raw.log | grep -E "^mlp|device" | cut -c1-200 | tee $OUT/v20b_mlp_32k.log
grep -E "Finished|compil" $OUT/v20b_raw.log | cut -c1-250 | tail -30
