# v26f (H100): the spacing rule as committed (every chunk's state saved where it and its
# compute-dtype copies fit 1/4 of the device's memory, shared by the blocks without remat; else
# sqrt(N)): the small TNT {8} LM with block remat profiled; the Titans mlp op and the TNT memory
# of mlp memories at 32K, fwd+bwd, against XLA and cuDNN attention; the new compiled test.
set -x
COMMON="--config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 --config.checkpoint_every=1000 --config.steps=24 --config.profile_start=20 --config.profile_steps=3"
DATA=configs/tnt_lm.py:size=small,data=.whl/war_and_peace.txt
timeout 170 python3 docs/results/v26_glue/top80.py --workdir /tmp/v26f_remat --config $DATA,implementation=pallas --config.model.remat=True $COMMON 2>&1 \
  | grep -v "^W1\|^I1" | grep -v "running the xla path" > $OUT/v26f_remat.log
grep -E "^step (1|20|24)/|wall|device busy|^ +[0-9.]+ ms +[0-9.]+%|rror" $OUT/v26f_remat.log | head -12
cp /tmp/v26f_remat/profile/summary.txt $OUT/summary_v26f_remat.txt
B="--mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd --lengths=32768"
timeout 300 python3 -m experiments.benchmark $B --models=mlp --reads=cumulative --chunks=16 --kernel_tnt=true --attention=true --out=$OUT/v26f_ops.jsonl 2>&1 | grep -v "^W1\|^I1" | cut -c1-260 | tee $OUT/v26f_ops.log | grep -E "tok/s|rror"
timeout 90 python3 -m pytest -q tests/kernels/test_chunk_memory.py -k "ChunkMemoryKernelTest and (budget or saved_every)" 2>&1 | tail -3 | tee $OUT/v26f_tests.txt
