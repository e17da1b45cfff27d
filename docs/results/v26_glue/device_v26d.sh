# v26d (H100): the small TNT {8} LM on the kernels with and without block remat, with the
# default checkpointing of the memory kernels (a group's start state saved every ~sqrt(N)
# chunks, the groups re-run in the backward) and with every chunk's state saved
# (kernel_blocks=save_every=1: no re-runs): steps 20..22 profiled (v26c: remat + default).
set -x
COMMON="--config.log_every=1 --config.eval_every=1000 --config.eval_batches=2 --config.checkpoint_every=1000 --config.steps=24 --config.profile_start=20 --config.profile_steps=3"
DATA=configs/tnt_lm.py:size=small,data=.whl/war_and_peace.txt
run() {  # name, seconds, config args...
  NAME=$1; SECS=$2; shift 2
  timeout $SECS python3 docs/results/v26_glue/top80.py --workdir /tmp/$NAME --config $DATA,implementation=pallas "$@" $COMMON 2>&1 \
    | grep -v "^W1\|^I1" | grep -v "running the xla path" > $OUT/$NAME.log
  grep -E "^step (1|20|24)/|wall|device busy|^ +[0-9.]+ ms +[0-9.]+%|rror" $OUT/$NAME.log | head -12
  cp /tmp/$NAME/profile/summary.txt $OUT/summary_$NAME.txt
}
run v26d_noremat 180 --config.model.remat=False
run v26d_noremat_save1 180 --config.model.remat=False --config.model.mixer_options.tnt.kernel_blocks=save_every=1
run v26d_remat_save1 180 --config.model.remat=True --config.model.mixer_options.tnt.kernel_blocks=save_every=1
