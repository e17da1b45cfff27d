# v24j (H100): TNT {8} again, this tree: on XLA for 200 steps (the XLA baseline of today's code),
# then on the kernels for 100 steps (a second run of v24i's, for the run-to-run spread).
set -x
run() {  # name, implementation, steps, timeout
  timeout $4 python3 -m experiments.train --workdir /tmp/$1 \
      --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=tnt,implementation=$2 \
      --config.steps=$3 --config.log_every=20 --config.eval_every=100 \
      --config.eval_batches=8 --config.checkpoint_every=1000 --config.model.remat=True 2>&1 \
    | grep -v "^W1\|^I1" | grep -E "^(model|step|eval|data|done)|Error|rror:" | tee $OUT/$1.log
  mkdir -p $OUT/$1 && cp /tmp/$1/logs/metrics.jsonl $OUT/$1/ 2>/dev/null
}
run tnt_xla xla 200 370
run tnt_pallas_rerun pallas 100 190
