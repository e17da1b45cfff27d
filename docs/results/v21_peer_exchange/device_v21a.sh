# v21a: the cluster exchange into peers only (two input slots for the Titans mlp walk; gd with
# hidden 256 at C = 32 on the Mosaic GPU walk): the Titans mlp op at 32K, a whole TNT memory of
# mlp memories at 32K with a profile, gd with hidden 256 at C = 32; then compiled tests.
set -x
B="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd"
timeout 170 $B --models=mlp --kernel_tnt=false --attention=false --chunks=16 --lengths=32768 --reads=cumulative --kernel_blocks=default --out=$OUT/v21a_mlp_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-200 | tee $OUT/v21a_mlp_32k.log
timeout 230 $B --models= --tnt_models=mlp --lengths=32768 --attention=true --kernel_blocks=default --kernel_profile_top=24 --out=$OUT/v21a_tnt_mlp.jsonl > $OUT/v21a_tnt_mlp.log 2>&1
grep -v "^W1\|^I1" $OUT/v21a_tnt_mlp.log | grep -E "^tnt|^attention|ms " | cut -c1-200 | head -40
timeout 170 $B --models=mlp --kernel_tnt=false --attention=false --rule=gd --chunks=32 --lengths=32768 --reads=cumulative --kernel_blocks=default --out=$OUT/v21a_gd_c32.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -3 | cut -c1-200 | tee $OUT/v21a_gd_c32.log
