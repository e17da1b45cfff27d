# v17f: the mlp chunk-start read at C = 16 on the Mosaic mlp rows against the Triton rows; a
# profile of the TNT memory of mlp memories with the default blocks (where the time goes).
set -x
timeout 200 python3 -m experiments.benchmark --mode=kernel --models=mlp --reads=chunk_start --min_chunk_start_chunk=16 --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --kernel_blocks=row_lowering=pallas,row_lowering=mosaic_gpu --out=$OUT/v17_mlp_chunk_start.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -8 | tee $OUT/v17_mlp_chunk_start.log
timeout 300 python3 -m experiments.benchmark --mode=kernel --models= --tnt_models=mlp --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_blocks=default --kernel_profile_top=10 --passes=fwd+bwd --out=$OUT/v17_tnt_mlp_profile.jsonl > $OUT/v17_tnt_mlp_profile.log 2>&1
grep -v "^W1\|^I1" $OUT/v17_tnt_mlp_profile.log | tail -30
