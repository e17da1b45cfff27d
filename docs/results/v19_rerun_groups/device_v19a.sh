# v19a: compile the final v18 tree's mlp tests (the scores' staging only when saved), profile the
# Titans mlp op at 32K (default blocks), and the layer benchmark at 32K on this tree.
set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
T=tests.kernels.test_chunk_rows_mgpu_mlp
timeout 200 python3 -m $T MosaicMlpRowsTest.test_matches_reference_titans_cumulative_4_slices MosaicMlpRowsTest.test_matches_reference_gd_cumulative_chunk_32_2_slices MosaicMlpRowsTest.test_forward_agrees_with_its_jnp_reference0 MosaicMlpRowsRulesTest > $OUT/gpu_tests_v19a.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|OK \]" $OUT/gpu_tests_v19a.txt | head -20
timeout 170 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=cumulative --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --kernel_blocks=default --kernel_profile_top=24 --passes=fwd+bwd --out=$OUT/v19a_mlp_profile.jsonl > $OUT/v19a_mlp_profile.log 2>&1
grep -v "^W1\|^I1" $OUT/v19a_mlp_profile.log | tail -32
timeout 200 python3 -m experiments.benchmark --mode=layer --kinds=tnt,titans --lengths=32768 --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 --layer_implementations=xla,pallas --out=$OUT/layer_v19a.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -10 | tee $OUT/layer_v19a.log
