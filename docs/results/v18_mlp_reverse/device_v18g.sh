# v18g: after moving the cluster exchange into one helper (cluster_sum): compiled forward and
# reverse walk of the 4-slice cluster.
set -x
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 240 python3 -m $T MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_titans_cumulative_4_slices MosaicMlpRowsTest.test_forward_agrees_with_its_jnp_reference0 MosaicMlpRowsTest.test_matches_reference_gd_chunk_start_2_slices > $OUT/gpu_tests_mlp_reverse_v18g.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_mlp_reverse_v18g.txt | head -20
