# v19g: the Titans mlp with hidden 128 at 32K (default vs one group per launch); the TNT memory of
# mlp memories at 8K with the default blocks, and attention at 8K (cut from v19f).
set -x
K="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd"
timeout 150 $K --models=mlp --expansion=2 --reads=cumulative --chunks=16 --lengths=32768 --attention=false --kernel_tnt=false --kernel_blocks=rerun_groups=1,default --out=$OUT/v19g_mlp_e2.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | cut -c1-160 | tee $OUT/v19g_mlp_e2.log
timeout 150 $K --models= --tnt_models=mlp --lengths=8192 --attention=true --kernel_blocks=default --out=$OUT/v19g_tnt_mlp_8k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -4 | cut -c1-160 | tee $OUT/v19g_tnt_mlp_8k.log
