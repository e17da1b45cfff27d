# v21b: compiled tests of the mlp kernels with the exchange into peers only.
T="python3 -m tests.kernels.test_chunk_rows_mgpu_mlp"
for t in MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices \
         MosaicMlpRowsTest.test_matches_reference_gd_cumulative_chunk_32_4_slices \
         MosaicMlpRowsTest.test_matches_reference_gd_chunk_start_2_slices \
         MosaicMlpRowsTest.test_reruns_beside_the_walk1 \
         MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_titans_cumulative_4_slices \
         MosaicMlpRowsTest.test_forward_agrees_with_its_jnp_reference0; do
  echo "== $t"; timeout 110 $T $t 2>&1 | grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|Mismatch|max rel" | head -8
done 2>&1 | tee $OUT/gpu_tests_v21b.txt
