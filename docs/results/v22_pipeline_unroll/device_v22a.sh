# v22a: the pipelined backward's scan two steps a turn (PIPELINE_UNROLL = 2, default) against one
# (v20/v21), the Titans mlp op at 32K; the default with a profile (the carry copies).
set -x
B="--mode=kernel --head_dims=64 --reps=5 --warmup=1 --affine_blocks= --passes=fwd+bwd --models=mlp --kernel_tnt=false --attention=false --chunks=16 --lengths=32768 --reads=cumulative --kernel_blocks=default"
timeout 250 python3 bench_unroll.py 1 $B --out=$OUT/v22a_unroll1.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -2 | cut -c1-200 | tee $OUT/v22a_unroll1.log
timeout 320 python3 bench_unroll.py 2 $B --kernel_profile_top=12 --out=$OUT/v22a_unroll2.jsonl > $OUT/v22a_unroll2.log 2>&1
grep -v "^W1\|^I1" $OUT/v22a_unroll2.log | grep -A14 "pallas " | cut -c1-200 | head -30
