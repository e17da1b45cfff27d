# v18a: the mlp reverse walk on Mosaic GPU (cluster of 64-unit slices): compiled tests, then timing.
set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 330 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest MosaicMlpRowsRulesTest > $OUT/gpu_tests_mlp_reverse_v18a.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:" $OUT/gpu_tests_mlp_reverse_v18a.txt | head -30
tail -5 $OUT/gpu_tests_mlp_reverse_v18a.txt
timeout 200 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=cumulative --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --kernel_blocks=row_lowering=mosaic_gpu+reverse_lowering=pallas,default,save_every=1 --out=$OUT/v18_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -12 | tee $OUT/v18_mlp_32k.log
timeout 200 python3 -m experiments.benchmark --mode=kernel --models= --tnt_models=mlp --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=true --kernel_blocks=row_lowering=mosaic_gpu+reverse_lowering=pallas,default --out=$OUT/v18_tnt_mlp.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -10 | tee $OUT/v18_tnt_mlp.log
