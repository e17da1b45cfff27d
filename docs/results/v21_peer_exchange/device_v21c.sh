# v21c: the re-runs beside the walk compiled (cut by v21b's time limit), and the Titans mlp op's
# chunk-start read at 32K.
timeout 300 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest.test_reruns_beside_the_walk1 > $OUT/gpu_tests_v21c.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:" $OUT/gpu_tests_v21c.txt | head
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd"
timeout 230 $B --models=mlp --kernel_tnt=false --attention=false --chunks=16 --lengths=32768 --reads=chunk_start --min_chunk_start_chunk=16 --kernel_blocks=default --out=$OUT/v21c_mlp_chunk_start.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-200 | tee $OUT/v21c_mlp_chunk_start.log
