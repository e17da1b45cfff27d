# v24f (H100): the compiled mlp kernel tests of this tree (reference cases, re-runs beside the
# walk, the forward against its jnp reference), and the multi-device tests (skipped: one GPU).
set -x
timeout 560 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest > $OUT/gpu_tests_v24f.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|relative error" $OUT/gpu_tests_v24f.txt | head -20
