# v19d: the rest of v19c (cut by its time limits): the Titans layer at 32K, the chunk-start read
# with the default blocks; and the stacked re-runs compiled on the Pallas (Triton) row kernel.
set -x
timeout 150 python3 -m experiments.benchmark --mode=layer --kinds=titans --lengths=32768 --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 --layer_implementations=xla,pallas --attention=false --out=$OUT/layer_v19d.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | tee $OUT/layer_v19d.log
timeout 150 python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --chunks=16 --lengths=32768 --passes=fwd+bwd --models=mlp --reads=chunk_start --min_chunk_start_chunk=16 --attention=false --kernel_tnt=false --kernel_blocks=default,row_lowering=pallas+rerun_groups=1,row_lowering=pallas --out=$OUT/v19d_mlp_chunk_start.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -5 | tee $OUT/v19d_mlp_chunk_start.log
timeout 200 python3 -m tests.kernels.test_chunk_memory ChunkMemoryKernelTest.test_checkpoint_groups_re_run_together0 ChunkMemoryKernelTest.test_checkpoint_groups_re_run_together1 KernelErrorsTest.test_auto_rerun_groups_fill_the_gpu > $OUT/gpu_tests_v19d.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_v19d.txt | head -20
