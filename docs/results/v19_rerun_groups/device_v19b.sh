# v19b: checkpoint groups re-run together (rows stacked) and the mlp re-run without outputs:
# compiled tests, then the Titans mlp and linear ops at 32K against one group per launch.
set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 230 python3 -m $T MosaicMlpRowsTest.test_backward_from_states_saved_every_few_chunks0 MosaicMlpRowsTest.test_backward_from_states_saved_every_few_chunks1 MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices MosaicMlpRowsTest.test_matches_reference_gd_chunk_start_2_slices MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_titans_cumulative_4_slices MosaicMlpRowsTest.test_forward_agrees_with_its_jnp_reference0 > $OUT/gpu_tests_v19b.txt 2>&1
timeout 80 python3 -m tests.kernels.test_chunk_rows_mgpu MosaicRowsTest.test_backward_from_states_saved_every_few_chunks0 MosaicRowsTest.test_backward_from_states_saved_every_few_chunks1 >> $OUT/gpu_tests_v19b.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_v19b.txt | head -20
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --chunks=16 --lengths=32768 --reads=cumulative --passes=fwd+bwd"
timeout 170 $B --models=mlp --kernel_blocks=rerun_groups=1,default,save_every=1 --out=$OUT/v19b_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -5 | tee $OUT/v19b_mlp_32k.log
timeout 120 $B --models=linear --kernel_blocks=rerun_groups=1,default,save_every=1 --out=$OUT/v19b_linear_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -5 | tee $OUT/v19b_linear_32k.log
