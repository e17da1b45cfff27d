# v18c: the TNT memory of mlp memories with the default blocks (the Mosaic mlp forward and now
# its reverse walk), the chunk-start read, a training shape, hidden 128; then the small LM.
set -x
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks="
timeout 150 $B --models= --tnt_models=mlp --lengths=32768 --attention=true --kernel_blocks=default --out=$OUT/v18_tnt_mlp_default.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -6 | tee $OUT/v18_tnt_mlp_default.log
timeout 130 $B --models=mlp --reads=chunk_start --min_chunk_start_chunk=16 --chunks=16 --lengths=32768 --attention=false --kernel_tnt=false --kernel_blocks=row_lowering=mosaic_gpu+reverse_lowering=pallas,default --out=$OUT/v18_mlp_chunk_start.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -6 | tee $OUT/v18_mlp_chunk_start.log
timeout 100 $B --models=mlp --reads=cumulative --chunks=16 --lengths=2048 --batch=16 --attention=false --kernel_tnt=false --kernel_blocks=default --out=$OUT/v18_mlp_b16.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | tee $OUT/v18_mlp_b16.log
timeout 90 $B --models=mlp --expansion=2 --reads=cumulative --chunks=16 --lengths=32768 --attention=false --kernel_tnt=false --kernel_blocks=default --out=$OUT/v18_mlp_e2.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | tee $OUT/v18_mlp_e2.log
timeout 110 python3 -m experiments.train --workdir /tmp/titans --config configs/tnt_lm.py:size=small,data=../.whl/war_and_peace.txt,mixer=titans,chunk=16 --config.steps=40 --config.log_every=10 --config.eval_every=1000 --config.checkpoint_every=1000 --config.model.remat=True --config.model.mixer_options.titans.implementation=pallas --config.model.mixer_options.titans.kernel_blocks=default 2>&1 | grep -E "^(model|step|data)|Error" | tee $OUT/v18_train_titans_mosaic.log
