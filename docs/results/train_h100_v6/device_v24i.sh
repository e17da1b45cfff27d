# v24i (H100): the small config's TNT {8} and Titans C = 8 trained on the fused kernels
# (implementation=pallas), the command of docs/train_h100.md otherwise unchanged; compare with
# the XLA runs train_h100_v4 (TNT) and train_h100_v5 (Titans C = 8).
set -x
for MIXER in tnt titans,chunk=8; do
  NAME=$(echo $MIXER | tr -d ',=' )_pallas
  timeout 285 python3 -m experiments.train --workdir /tmp/$NAME \
      --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=$MIXER,implementation=pallas \
      --config.steps=200 --config.log_every=20 --config.eval_every=100 \
      --config.eval_batches=8 --config.checkpoint_every=1000 --config.model.remat=True 2>&1 \
    | grep -v "^W1\|^I1" | grep -E "^(model|step|eval|data|done|saved)|Error|rror:|wrote|bits" | tee $OUT/${NAME}.log
  mkdir -p $OUT/$NAME && cp /tmp/$NAME/logs/metrics.jsonl $OUT/$NAME/ 2>/dev/null
done
