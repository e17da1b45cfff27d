# v19f: whole TNT memories (linear and mlp) at 8K, where the local memories are 48 rows (4 shards
# x 12 heads) and re-run two groups at once by default, against one per launch; and at 32K.
set -x
K="python3 -m experiments.benchmark --mode=kernel --head_dims=64 --reps=5 --warmup=2 --affine_blocks= --passes=fwd+bwd --models="
timeout 200 $K --tnt_models=linear,mlp --lengths=8192 --attention=true --kernel_blocks=rerun_groups=1,default,save_every=1 --out=$OUT/v19f_tnt_8k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -10 | cut -c1-160 | tee $OUT/v19f_tnt_8k.log
timeout 150 $K --tnt_models=linear --lengths=32768 --attention=true --kernel_blocks=rerun_groups=1,default --out=$OUT/v19f_tnt_32k.jsonl 2>&1 | grep -v "^W1\|^I1" | tail -5 | cut -c1-160 | tee $OUT/v19f_tnt_32k.log
