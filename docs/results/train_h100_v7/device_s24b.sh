# s24b (H100): the small TNT {8} LM on the kernels again, now with the one-hot embedding lookup
# (auto at vocab 256): the profile of steps 20..22; then two runs one after the other with
# --config.deterministic=True (bitwise equal losses?).
set -x
COMMON="--config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 --config.checkpoint_every=1000 --config.model.remat=True"
DATA=configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt
run() {  # name, seconds, config args...
  NAME=$1; SECS=$2; shift 2
  timeout $SECS python3 -m experiments.train --workdir /tmp/$NAME "$@" $COMMON 2>&1 \
    | grep -v "^W1\|^I1" | grep -v "running the xla path" > $OUT/$NAME.log
  grep -E "^step (1|2|20|21|26)/|wall|device busy|^ +[0-9.]+ ms +[0-9.]+%|done|rror" $OUT/$NAME.log | head -30
}
run tnt_onehot 200 --config $DATA,implementation=pallas --config.steps=26 --config.profile_start=20 --config.profile_steps=3
cp /tmp/tnt_onehot/profile/summary.txt $OUT/summary_tnt_onehot.txt
run det1 150 --config $DATA,implementation=pallas --config.steps=20 --config.deterministic=True
run det2 150 --config $DATA,implementation=pallas --config.steps=20 --config.deterministic=True
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
rows = []
for i in (1, 2):
  try:
    rows.append({r["step"]: r["train_loss"] for r in map(json.loads, open(f"/tmp/det{i}/logs/metrics.jsonl")) if "train_loss" in r})
  except OSError as e:
    rows.append({}); print(e)
same = [s for s in rows[0] if rows[0][s] == rows[1].get(s)]
print("deterministic runs: steps", len(rows[0]), len(rows[1]), "bitwise equal at", len(same), "steps; first difference",
      next((s for s in sorted(rows[0]) if rows[0][s] != rows[1].get(s)), None))
for s in sorted(rows[0])[-3:]: print(s, repr(rows[0][s]), repr(rows[1].get(s)))
json.dump(rows, open(f"{out}/det_losses.json", "w"))
PY
