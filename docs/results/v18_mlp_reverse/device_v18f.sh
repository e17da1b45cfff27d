# v18f: the rest of the compiled mlp tests on the final kernel, the row-kernel class's mlp cases,
# and the layer benchmark on this tree.
set -x
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 230 python3 -m $T MosaicMlpRowsTest.test_backward_from_states_saved_every_few_chunks MosaicMlpRowsTest.test_matches_reference_gd_cumulative_chunk_32_2_slices MosaicMlpRowsTest.test_matches_reference_titans_cumulative_chunk_8_padded MosaicMlpRowsTest.test_reverse_walk_agrees_with_the_pallas_reverse_kernel MosaicMlpRowsTest.test_forward_agrees_with_its_jnp_reference0 > $OUT/gpu_tests_mlp_reverse_v18f.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_mlp_reverse_v18f.txt | head -30
timeout 90 python3 -m tests.kernels.test_chunk_memory ChunkMemoryKernelTest.test_matches_reference_bfloat163 ChunkMemoryKernelTest.test_matches_reference_bfloat162 2>&1 | tail -3 | tee $OUT/gpu_tests_chunk_memory_v18f.txt
timeout 200 python3 -m experiments.benchmark --mode=layer --kinds=tnt,titans --lengths=2048,32768 --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 --layer_implementations=xla,pallas --out=$OUT/layer_v18f.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -14 | tee $OUT/layer_v18f.log
