# v26b (H100): the local memory of the small TNT {8} LM alone (the Titans mlp op, 64 rows of
# 512 tokens x 6 heads, C = 8 padded to 16), XLA against the kernels, fwd+bwd, profiled, with
# the optimized HLO of the kernels' module dumped (to read the glue's fusions).
set -x
B="--mode=kernel --head_dims=64 --reps=3 --warmup=1 --affine_blocks= --passes=fwd+bwd --kernel_tnt=false --attention=false --kernel_profile_top=40"
XLA_FLAGS="--xla_dump_to=/tmp/v26b_dump --xla_dump_hlo_module_re=.*loss.* --xla_dump_hlo_as_text" \
timeout 300 python3 -m experiments.benchmark $B --models=mlp --reads=cumulative --chunks=8 --lengths=512 --batch=64 --heads=6 --out=$OUT/v26b_local8.jsonl 2>&1 | grep -v "^W1\|^I1" | cut -c1-260 | tee $OUT/v26b_local8.log | grep -E "tok/s|rror"
ls -la /tmp/v26b_dump | head -30
cd /tmp/v26b_dump && tar czf $OUT/v26b_hlo.tgz $(ls | grep -E "after_optimizations.txt$|after_optimizations-buffer")
ls -la $OUT
