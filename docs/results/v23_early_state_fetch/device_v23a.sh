# v23a: the walk fetches the next chunk's S1, S2 blocks before phase B: compiled tests, then the
# Titans mlp op and the TNT memory of mlp memories at 32K.
T="python3 -m tests.kernels.test_chunk_rows_mgpu_mlp"
timeout 170 $T MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_titans_cumulative_4_slices > $OUT/gpu_tests_v23a.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:" $OUT/gpu_tests_v23a.txt | head
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd --kernel_blocks=default"
timeout 190 $B --models=mlp --kernel_tnt=false --attention=false --chunks=16 --lengths=32768 --reads=cumulative --out=$OUT/v23a_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -2 | cut -c1-220 | tee $OUT/v23a_mlp_32k.log
timeout 200 $B --models= --tnt_models=mlp --lengths=32768 --attention=true --out=$OUT/v23a_tnt_mlp.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-220 | tee $OUT/v23a_tnt_mlp.log
