# s24a (H100): where the small TNT {8} LM's training step goes on the fused kernels (a profile of
# steps 20..22 through --config.profile_steps), then two concurrent runs of the same command with
# --config.deterministic=True: are their losses bitwise equal?
set -x
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import jax; print(jax.__version__)"
COMMON="--config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 --config.checkpoint_every=1000 --config.model.remat=True"
CFG=configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,implementation=pallas
timeout 260 python3 -m experiments.train --workdir /tmp/prof --config $CFG --config.steps=26 \
    --config.profile_start=20 --config.profile_steps=3 $COMMON 2>&1 \
  | grep -v "^W1\|^I1" | grep -v "running the xla path" | tee $OUT/profile_tnt_pallas.log | tail -60
cp /tmp/prof/profile/summary.txt $OUT/summary_tnt_pallas.txt 2>/dev/null
for R in 1 2; do
  timeout 290 python3 -m experiments.train --workdir /tmp/det$R --config $CFG --config.steps=20 \
      --config.deterministic=True $COMMON > $OUT/det$R.log 2>&1 &
done
wait
for R in 1 2; do grep -v "^W1\|^I1" $OUT/det$R.log | grep -E "^step|done|rror" | tail -4; cp /tmp/det$R/logs/metrics.jsonl $OUT/det$R.jsonl; done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
rows = [{r["step"]: r["train_loss"] for r in map(json.loads, open(f"{out}/det{i}.jsonl")) if "train_loss" in r} for i in (1, 2)]
same = [s for s in rows[0] if rows[0][s] == rows[1].get(s)]
print("deterministic runs: steps", len(rows[0]), len(rows[1]), "bitwise equal at", len(same), "steps;",
      "first difference", next((s for s in sorted(rows[0]) if rows[0][s] != rows[1].get(s)), None))
for s in sorted(rows[0])[-3:]: print(s, repr(rows[0][s]), repr(rows[1].get(s)))
PY
