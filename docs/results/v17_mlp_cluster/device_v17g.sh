# v17g: the mlp kernel copying its slice blocks straight from and to the state's own layout
# (strided TMA boxes; no XLA transposes), and auto taking the mlp's chunk-start read too:
# compiled tests, then the TNT memory of mlp memories and the op again.
set -x
timeout 230 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest > $OUT/gpu_tests_mlp_rows_v17g.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:" $OUT/gpu_tests_mlp_rows_v17g.txt | head -20
timeout 100 python3 -m tests.kernels.test_chunk_memory ChunkMemoryKernelTest.test_matches_reference_bfloat163 ChunkMemoryKernelTest.test_matches_reference_bfloat162 2>&1 | tail -3 | tee $OUT/gpu_tests_chunk_memory_v17g.txt
timeout 200 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=cumulative --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_blocks=default --out=$OUT/v17g.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -8 | tee $OUT/v17g.log
