# v26c (H100): the gate coefficients composed token by token at small chunks (v26) against the
# associative scan (before): the small TNT {8} LM's local memory alone (64 rows of 512 tokens x
# 6 heads, C = 8), fwd+bwd, one process each way; then the LM step profiled again.
set -x
B="--mode=kernel --head_dims=64 --reps=5 --warmup=2 --affine_blocks= --passes=fwd+bwd --kernel_tnt=false --attention=false --kernel_profile_top=12 --models=mlp --reads=cumulative --chunks=8 --lengths=512 --batch=64 --heads=6"
for S in 0 32; do
timeout 150 python3 docs/results/v26_glue/bench_coefs.py $S $B --out=$OUT/v26c_local8_seq$S.jsonl 2>&1 | grep -v "^W1\|^I1" | cut -c1-260 > $OUT/v26c_local8_seq$S.log
grep -E "tok/s|rror" $OUT/v26c_local8_seq$S.log
done
COMMON="--config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 --config.checkpoint_every=1000 --config.model.remat=True"
DATA=configs/tnt_lm.py:size=small,data=.whl/war_and_peace.txt
timeout 240 python3 docs/results/v26_glue/top80.py --workdir /tmp/v26c_tnt --config $DATA,implementation=pallas --config.steps=24 --config.profile_start=20 --config.profile_steps=3 $COMMON 2>&1 \
  | grep -v "^W1\|^I1" | grep -v "running the xla path" > $OUT/v26c_tnt.log
grep -E "^step (1|20|24)/|wall|device busy|^ +[0-9.]+ ms +[0-9.]+%|rror" $OUT/v26c_tnt.log | head
cp /tmp/v26c_tnt/profile/summary.txt $OUT/summary_v26c_tnt.txt
