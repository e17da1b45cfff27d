# v20d: the compiled tests of the re-runs beside the walk (the reference cases now take it: their
# few rows leave room), then end to end, the small Titans LM on one 32K sequence per step.
set -x
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 320 python3 -m $T MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices MosaicMlpRowsTest.test_matches_reference_gd_chunk_start_2_slices MosaicMlpRowsTest.test_reruns_beside_the_walk2 MosaicMlpRowsTest.test_backward_from_states_saved_every_few_chunks1 MosaicMlpRowsTest.test_reverse_walk_on_independent_coefficients_titans_cumulative_4_slices > $OUT/gpu_tests_v20d.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_v20d.txt | head -20
TR="python3 -m experiments.train --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=titans,chunk=16 --config.steps=30 --config.log_every=10 --config.eval_every=1000 --config.checkpoint_every=1000 --config.model.remat=True --config.data.seq_len=32768 --config.data.batch_size=1"
timeout 230 $TR --workdir /tmp/t_default --config.model.mixer_options.titans.implementation=pallas --config.model.mixer_options.titans.kernel_blocks=default 2>&1 | grep -E "^(model|step|data)|Error" | tee $OUT/v20d_train_default.log
