# s24d (H100): the main table's command (docs/train_h100.md) on this tree, 200 steps each, with
# the one-hot embedding (auto at byte level): attention, TNT {8} and Titans C = 8 on the kernels.
set -x
for MIXER in attention tnt,implementation=pallas titans,chunk=8,implementation=pallas; do
  NAME=$(echo $MIXER | sed 's/,implementation=pallas/_pallas/' | tr -d ',=')
  START=$(date +%s)
  timeout 190 python3 -m experiments.train --workdir /tmp/$NAME \
      --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=$MIXER \
      --config.steps=200 --config.log_every=20 --config.eval_every=100 \
      --config.eval_batches=8 --config.checkpoint_every=1000 --config.model.remat=True 2>&1 \
    | grep -v "^W1\|^I1" | grep -E "^(model|step|eval|data|done)|Error|rror:" > $OUT/${NAME}.log
  echo "$NAME wall $(( $(date +%s) - START )) s" | tee -a $OUT/${NAME}.log
  grep -E "^(step (40|100|200)/|eval|done)" $OUT/${NAME}.log
  mkdir -p $OUT/$NAME && cp /tmp/$NAME/logs/metrics.jsonl $OUT/$NAME/ 2>/dev/null
done
