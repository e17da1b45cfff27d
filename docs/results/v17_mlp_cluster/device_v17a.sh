# v17: the Mosaic GPU mlp row kernel (hidden units over a cluster). Compiled tests, then timing.
set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 300 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest MosaicMlpRowsRulesTest 2>&1 | tail -30 | tee $OUT/gpu_tests_mlp_rows.txt
timeout 120 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest.test_forward_agrees_with_its_jnp_reference0 MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices 2>&1 | tail -8 | tee $OUT/gpu_tests_mlp_rows_again.txt
timeout 120 python3 -m tests.kernels.test_chunk_rows_mgpu MosaicRowsTest.test_ops_mosaic_refuses_run_on_the_pallas_row_kernel_mlp MosaicRowsRulesTest 2>&1 | tail -8 | tee $OUT/gpu_tests_rows_refusals.txt
timeout 330 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=cumulative --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=true --kernel_blocks=default,row_lowering=mosaic_gpu,row_lowering=mosaic_gpu+save_every=1 --out=$OUT/v17_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -40 | tee $OUT/v17_mlp_32k.log
