# v20e: a profile of the Titans mlp op with the re-runs beside the walk; the Titans layer at one
# 32K sequence; the independent-coefficient case compiled (cut from v20d).
set -x
timeout 200 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=cumulative --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --kernel_blocks=default --kernel_profile_top=16 --passes=fwd+bwd --out=$OUT/v20e_mlp_profile.jsonl > $OUT/v20e_mlp_profile.log 2>&1
grep -v "^W1\|^I1" $OUT/v20e_mlp_profile.log | grep -A20 "pallas" | cut -c1-200 | head -24
timeout 160 python3 -m experiments.benchmark --mode=layer --kinds=titans --lengths=32768 --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 --layer_implementations=xla,pallas --attention=false --out=$OUT/layer_v20e.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | tee $OUT/layer_v20e.log
timeout 180 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_titans_cumulative_4_slices > $OUT/gpu_tests_v20e.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_v20e.txt | head -20
