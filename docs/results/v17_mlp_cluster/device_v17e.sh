# v17e: end to end, the small LM (mlp memories, hidden 256) on War and Peace, 40 steps, batch
# 16 x 2048: implementation=pallas with the default blocks (the Mosaic mlp rows) against the
# Triton rows (kernel_blocks=row_lowering=pallas). Titans C = 16, and TNT with local chunk 16.
set -x
run() {  # name mixer-args kind blocks
  timeout 140 python3 -m experiments.train --workdir /tmp/$1 \
    --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,$2 \
    --config.steps=40 --config.log_every=10 --config.eval_every=1000 --config.checkpoint_every=1000 \
    --config.model.remat=True --config.model.mixer_options.$3.implementation=pallas \
    --config.model.mixer_options.$3.kernel_blocks=$4 2>&1 | grep -E "^(model|step|data)|Error" | tee $OUT/v17_train_$1.log
}
run titans_mosaic "mixer=titans,chunk=16" titans default
run titans_triton "mixer=titans,chunk=16" titans row_lowering=pallas
run tnt_mosaic "mixer=tnt,local_chunks=16" tnt default
run tnt_triton "mixer=tnt,local_chunks=16" tnt row_lowering=pallas
