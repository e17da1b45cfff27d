# v24a (2 x H200): the fused kernels on several GPUs, compiled: the data-parallel rows under a
# mesh, and the context-parallel TNT op (chain and gather hand-offs), against the float32
# reference; then the small TNT LM trained data-parallel over both GPUs on the kernels.
set -x
nvidia-smi -L
timeout 200 python3 -m tests.kernels.test_chunk_memory KernelUnderAMeshTest > $OUT/gpu_tests_v24a_mesh.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|relative error" $OUT/gpu_tests_v24a_mesh.txt | head
timeout 260 python3 -m tests.parallel.test_context ContextParallelKernelTest > $OUT/gpu_tests_v24a_context.txt 2>&1
grep -E "^(ERROR|FAIL|OK|Ran)|Error:|error:|relative error" $OUT/gpu_tests_v24a_context.txt | head
TR="python3 -m experiments.train --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,implementation=pallas --config.steps=30 --config.log_every=10 --config.eval_every=1000 --config.checkpoint_every=1000"
timeout 200 $TR --workdir /tmp/dp2 2>&1 | grep -E "^(model|step|data|mesh)|Error|devices" | tee $OUT/v24a_train_dp2.log
