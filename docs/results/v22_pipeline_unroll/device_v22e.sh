# v22e: is v22d's step-30 loss (2.4293 against v20's 2.4116) the schedule or run-to-run spread?
# The same run again with the default (two steps a turn), then at one step a turn.
A="--config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=titans,chunk=16 --config.steps=30 --config.log_every=10 --config.eval_every=1000 --config.checkpoint_every=1000 --config.model.remat=True --config.data.seq_len=32768 --config.data.batch_size=1 --config.model.mixer_options.titans.implementation=pallas --config.model.mixer_options.titans.kernel_blocks=default"
for u in 2 1; do
  echo "== PIPELINE_UNROLL=$u"
  timeout 250 python3 train_unroll.py $u $A --workdir /tmp/t_u$u 2>&1 | grep -E "^step|Error"
done 2>&1 | tee $OUT/v22e_train_spread.log
