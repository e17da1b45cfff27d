# v17d: the rounding probe; hidden 128 (2 slices) against the Pallas rows; a TNT memory of mlp
# memories with the default blocks (auto: the Mosaic mlp rows) against the Pallas rows.
set -x
timeout 150 python3 docs/results/v17_mlp_cluster/rounding_probe.py 2>&1 | grep -v "^W1\|^I1" | tail -14 | tee $OUT/rounding_probe.txt
timeout 200 python3 -m experiments.benchmark --mode=kernel --models=mlp --expansion=2 --reads=cumulative --chunks=16 --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_tnt=false --kernel_blocks=row_lowering=pallas,default --out=$OUT/v17_mlp_e2.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -8 | tee $OUT/v17_mlp_e2.log
timeout 200 python3 -m experiments.benchmark --mode=kernel --models= --tnt_models=mlp --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=true --kernel_blocks=row_lowering=pallas,default --out=$OUT/v17_tnt_mlp.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -10 | tee $OUT/v17_tnt_mlp.log
