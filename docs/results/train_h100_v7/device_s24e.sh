# s24e (H100): TNT {8} of s24d again with time for 200 steps; then the attention LM twice with
# --config.deterministic=True (does cuDNN attention compile under XLA's deterministic ops, and
# are the two runs' losses bitwise equal?).
set -x
NAME=tnt_pallas
START=$(date +%s)
timeout 300 python3 -m experiments.train --workdir /tmp/$NAME \
    --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=tnt,implementation=pallas \
    --config.steps=200 --config.log_every=20 --config.eval_every=100 \
    --config.eval_batches=8 --config.checkpoint_every=1000 --config.model.remat=True 2>&1 \
  | grep -v "^W1\|^I1" | grep -E "^(model|step|eval|data|done)|Error|rror:" > $OUT/${NAME}.log
echo "$NAME wall $(( $(date +%s) - START )) s" | tee -a $OUT/${NAME}.log
grep -E "^(step (40|100|200)/|eval|done)" $OUT/${NAME}.log
mkdir -p $OUT/$NAME && cp /tmp/$NAME/logs/metrics.jsonl $OUT/$NAME/ 2>/dev/null
for R in 1 2; do
  timeout 100 python3 -m experiments.train --workdir /tmp/attdet$R \
      --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=attention \
      --config.steps=30 --config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 \
      --config.checkpoint_every=1000 --config.model.remat=True --config.deterministic=True 2>&1 \
    | grep -v "^W1\|^I1" | grep -E "^(step|done)|Error|rror:" > $OUT/attdet$R.log
  tail -3 $OUT/attdet$R.log
done
python3 - <<'PY'
import json
rows = []
for i in (1, 2):
  try:
    rows.append({r["step"]: r["train_loss"] for r in map(json.loads, open(f"/tmp/attdet{i}/logs/metrics.jsonl")) if "train_loss" in r})
  except OSError as e:
    rows.append({}); print(e)
print("attention deterministic runs: steps", len(rows[0]), len(rows[1]), "bitwise equal at",
      sum(rows[0][s] == rows[1].get(s) for s in rows[0]), "steps")
PY
