# v18b: the rest of the compiled mlp tests (the reverse walk on independent coefficients, against
# the Pallas reverse kernel, the rules), the row-kernel class's mlp bf16 cases (auto), then the
# TNT memory of mlp memories and the chunk-start read.
set -x
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 280 python3 -m $T $(for c in titans_cumulative_4_slices gd_chunk_start_2_slices titans_chunk_start_1_slice_dot gd_cumulative_chunk_32_dot titans_cumulative_2_slices_silu; do echo MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_$c; done) MosaicMlpRowsTest.test_reverse_walk_agrees_with_the_pallas_reverse_kernel MosaicMlpRowsTest.test_memory_op_routes_to_the_mosaic_mlp_kernel MosaicMlpRowsRulesTest > $OUT/gpu_tests_mlp_reverse_v18b.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_mlp_reverse_v18b.txt | head -30
timeout 100 python3 -m tests.kernels.test_chunk_memory ChunkMemoryKernelTest.test_matches_reference_bfloat163 ChunkMemoryKernelTest.test_matches_reference_bfloat162 2>&1 | tail -3 | tee $OUT/gpu_tests_chunk_memory_v18b.txt
timeout 170 python3 -m experiments.benchmark --mode=kernel --models= --tnt_models=mlp --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=true --kernel_blocks=row_lowering=mosaic_gpu+reverse_lowering=pallas,default --out=$OUT/v18_tnt_mlp.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -10 | tee $OUT/v18_tnt_mlp.log
