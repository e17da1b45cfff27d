# s24c (H100): the small LMs with the one-hot embedding: TNT {8} on the kernels without block
# remat (the kernels save little, so does it fit, and how much does the forward's second run
# cost?), attention (cuDNN) with the take and the one-hot lookup, and Titans C = 8 on the kernels.
set -x
COMMON="--config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 --config.checkpoint_every=1000 --config.profile_start=20 --config.profile_steps=3 --config.steps=26"
DATA=configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt
run() {  # name, seconds, config args...
  NAME=$1; SECS=$2; shift 2
  timeout $SECS python3 -m experiments.train --workdir /tmp/$NAME "$@" $COMMON 2>&1 \
    | grep -v "^W1\|^I1" | grep -v "running the xla path" > $OUT/$NAME.log
  grep -E "^step (1|2|19|20|26)/|wall|device busy|^ +[0-9.]+ ms +[0-9.]+%|done|rror|memory" $OUT/$NAME.log | head -30
  cp /tmp/$NAME/profile/summary.txt $OUT/summary_$NAME.txt
}
run tnt_noremat 170 --config $DATA,implementation=pallas --config.model.remat=False
run attention_take 130 --config $DATA,mixer=attention --config.model.embedding_lookup=take --config.model.remat=True
run attention_onehot 130 --config $DATA,mixer=attention --config.model.remat=True
run titans8_onehot 170 --config $DATA,mixer=titans,chunk=8,implementation=pallas --config.model.remat=True
