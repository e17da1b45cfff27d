# v26a (H100): where the glue goes. The small TNT {8} LM on the kernels (remat, one-hot lookup):
# the profile of steps 20..22 with 80 kernels; then the global memory alone (mlp, chunk-start,
# C = 2048, one 32K sequence, XLA) profiled.
set -x
COMMON="--config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 --config.checkpoint_every=1000 --config.model.remat=True"
DATA=configs/tnt_lm.py:size=small,data=.whl/war_and_peace.txt
timeout 240 python3 docs/results/v26_glue/top80.py --workdir /tmp/v26a_tnt --config $DATA,implementation=pallas --config.steps=24 --config.profile_start=20 --config.profile_steps=3 $COMMON 2>&1 \
  | grep -v "^W1\|^I1" | grep -v "running the xla path" > $OUT/v26a_tnt.log
grep -E "^step (1|20|24)/|wall|device busy|^ +[0-9.]+ ms +[0-9.]+%|rror" $OUT/v26a_tnt.log | head
cp /tmp/v26a_tnt/profile/summary.txt $OUT/summary_v26a_tnt.txt
B="--mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd,fwd+bwd --kernel_tnt=false --attention=false --kernel_profile_top=60"
timeout 200 python3 -m experiments.benchmark $B --models=mlp --reads=chunk_start --chunks=2048 --lengths=32768 --out=$OUT/v26a_global.jsonl 2>&1 | grep -v "^W1\|^I1" | cut -c1-260 | tee $OUT/v26a_global.log | grep -E "tok/s|rror"
