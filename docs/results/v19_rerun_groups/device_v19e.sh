# v19e: end to end, the small Titans LM (mlp memories, C = 16) on one sequence of 32K tokens per
# step (6 heads: the re-runs stack 5 groups by default), groups re-run together against one per
# launch, and XLA.
set -x
TR="python3 -m experiments.train --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=titans,chunk=16 --config.steps=30 --config.log_every=10 --config.eval_every=1000 --config.checkpoint_every=1000 --config.model.remat=True --config.data.seq_len=32768 --config.data.batch_size=1"
timeout 150 $TR --workdir /tmp/t_default --config.model.mixer_options.titans.implementation=pallas --config.model.mixer_options.titans.kernel_blocks=default 2>&1 | grep -E "^(model|step|data)|Error" | tee $OUT/v19e_train_default.log
timeout 150 $TR --workdir /tmp/t_one --config.model.mixer_options.titans.implementation=pallas --config.model.mixer_options.titans.kernel_blocks=rerun_groups=1 2>&1 | grep -E "^(model|step|data)|Error" | tee $OUT/v19e_train_rerun1.log
timeout 200 $TR --workdir /tmp/t_xla --config.model.mixer_options.titans.implementation=xla 2>&1 | grep -E "^(model|step|data)|Error" | tee $OUT/v19e_train_xla.log
