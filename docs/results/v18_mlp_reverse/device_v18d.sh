# v18d: where the TNT memory of mlp memories spends its time now (profile, default blocks), and
# the layer benchmark (TNT and Titans layers, xla against pallas) on this tree.
set -x
timeout 200 python3 -m experiments.benchmark --mode=kernel --models= --tnt_models=mlp --lengths=32768 --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --attention=false --kernel_blocks=default --kernel_profile_top=14 --passes=fwd+bwd --out=$OUT/v18_tnt_mlp_profile.jsonl > $OUT/v18_tnt_mlp_profile.log 2>&1
grep -v "^W1\|^I1" $OUT/v18_tnt_mlp_profile.log | tail -24
timeout 330 python3 -m experiments.benchmark --mode=layer --kinds=tnt,titans --lengths=2048,32768 --chunks=16 --passes=fwd+bwd --tokens=32768 --reps=3 --warmup=1 --layer_implementations=xla,pallas --out=$OUT/layer_v18.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -14 | tee $OUT/layer_v18.log
