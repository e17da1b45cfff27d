# v22b: the re-runs beside the walk compiled with the scan two steps a turn (10 chunks in groups
# of 2: one turn, then one step left over); the Titans layer at one 32K sequence.
timeout 330 python3 -m tests.kernels.test_chunk_rows_mgpu_mlp MosaicMlpRowsTest.test_reruns_beside_the_walk0 > $OUT/gpu_tests_v22b.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:" $OUT/gpu_tests_v22b.txt | head
timeout 240 python3 -m experiments.benchmark --mode=layer --kinds=titans --lengths=32768 --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 --layer_implementations=xla,pallas --attention=false --out=$OUT/layer_v22b.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-200 | tee $OUT/layer_v22b.log
