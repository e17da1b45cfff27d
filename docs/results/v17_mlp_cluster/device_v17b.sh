# v17b: the compiled mlp row-kernel tests in full, the rounding probe, and a training shape.
set -x
timeout 280 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest > $OUT/gpu_tests_mlp_rows_full.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran|[A-Za-z]*Error)|Error:|error:" $OUT/gpu_tests_mlp_rows_full.txt | head -30
timeout 120 python3 docs/results/v17_mlp_cluster/rounding_probe.py 2>&1 | grep -v "^W1\|^I1" | tail -14 | tee $OUT/rounding_probe.txt
timeout 170 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=cumulative --chunks=16 --lengths=2048 --batch=16 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --kernel_blocks=default,row_lowering=mosaic_gpu --out=$OUT/v17_mlp_b16.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -12 | tee $OUT/v17_mlp_b16.log
