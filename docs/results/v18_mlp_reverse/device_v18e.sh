# v18e: the reverse walk with the chunk-end inner products in the kernel, compute-dtype saved
# states and no coefficient staging: compiled tests, then the op and the TNT memory again.
set -x
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 250 python3 -m $T $(for c in titans_cumulative_4_slices gd_chunk_start_2_slices titans_chunk_start_1_slice_dot gd_cumulative_chunk_32_dot titans_cumulative_2_slices_silu; do echo MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_$c MosaicMlpRowsTest.test_matches_reference_$c; done) MosaicMlpRowsTest.test_backward_from_states_saved_every_few_chunks > $OUT/gpu_tests_mlp_reverse_v18e.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_mlp_reverse_v18e.txt | head -30
timeout 120 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=cumulative --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --kernel_blocks=default --out=$OUT/v18e_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | tee $OUT/v18e_mlp_32k.log
timeout 150 python3 -m experiments.benchmark --mode=kernel --models= --tnt_models=mlp --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=true --kernel_blocks=default --out=$OUT/v18e_tnt_mlp.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -6 | tee $OUT/v18e_tnt_mlp.log
