# v19c: where the Titans mlp op's time goes with groups re-run together (profile); the TNT memory
# of mlp memories and attention; the layer benchmark at 32K; the chunk-start read.
set -x
K="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --chunks=16 --lengths=32768 --passes=fwd+bwd"
timeout 120 $K --models=mlp --reads=cumulative --attention=false --kernel_tnt=false --kernel_blocks=default --kernel_profile_top=16 --out=$OUT/v19c_mlp_profile.jsonl > $OUT/v19c_mlp_profile.log 2>&1
grep -v "^W1\|^I1" $OUT/v19c_mlp_profile.log | tail -40 | cut -c1-200
timeout 130 $K --models= --tnt_models=mlp --attention=true --kernel_blocks=default --out=$OUT/v19c_tnt_mlp.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -5 | tee $OUT/v19c_tnt_mlp.log
timeout 100 $K --models=mlp --reads=chunk_start --min_chunk_start_chunk=16 --attention=false --kernel_tnt=false --kernel_blocks=rerun_groups=1,default --out=$OUT/v19c_mlp_chunk_start.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | tee $OUT/v19c_mlp_chunk_start.log
timeout 200 python3 -m experiments.benchmark --mode=layer --kinds=tnt,titans --lengths=32768 --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 --layer_implementations=xla,pallas --out=$OUT/layer_v19c.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -8 | tee $OUT/layer_v19c.log
