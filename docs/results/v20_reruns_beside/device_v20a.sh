# v20a: the next checkpoint groups re-run beside the mlp reverse walk in one launch (overlap_reruns,
# auto on): the Titans mlp op at 32K against re-run-then-walk, then the compiled tests.
set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --chunks=16 --lengths=32768 --passes=fwd+bwd --models=mlp"
timeout 170 $B --reads=cumulative --kernel_blocks=overlap_reruns=false,default --out=$OUT/v20a_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -5 | cut -c1-200 | tee $OUT/v20a_mlp_32k.log
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 250 python3 -m $T MosaicMlpRowsTest.test_reruns_beside_the_walk0 MosaicMlpRowsTest.test_reruns_beside_the_walk1 MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices MosaicMlpRowsTest.test_backward_from_states_saved_every_few_chunks1 > $OUT/gpu_tests_v20a.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_v20a.txt | head -20
timeout 140 $B --reads=chunk_start --min_chunk_start_chunk=16 --kernel_blocks=overlap_reruns=false,default --out=$OUT/v20a_mlp_chunk_start.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -5 | cut -c1-200 | tee $OUT/v20a_mlp_chunk_start.log
