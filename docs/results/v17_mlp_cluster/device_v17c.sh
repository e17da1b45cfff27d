# v17c: after the power-of-2 rule and row_lowering="auto" taking the mlp kernel for cumulative
# reads: the compiled mlp row-kernel tests, and the compiled row-kernel class (default blocks).
set -x
timeout 230 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest MosaicMlpRowsRulesTest > $OUT/gpu_tests_mlp_rows_v17c.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:" $OUT/gpu_tests_mlp_rows_v17c.txt | head -20
timeout 340 python3 -m tests.kernels.test_chunk_memory ChunkMemoryKernelTest > $OUT/gpu_tests_chunk_memory_v17c.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:" $OUT/gpu_tests_chunk_memory_v17c.txt | head -20
