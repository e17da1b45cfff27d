# v24e (H100): work beside in-flight wgmmas (mms during=) against the tree before it (7a5dc48),
# one process each, same machine: the Titans mlp op (hidden 256) and a TNT memory of mlp
# memories at 32K, fwd and fwd+bwd.
set -x
B="--mode=kernel --head_dims=64 --reps=5 --warmup=1 --affine_blocks= --passes=fwd,fwd+bwd --models=mlp --reads=cumulative --chunks=16 --lengths=32768 --attention=false --kernel_tnt=true"
(cd ../.bench_old && PYTHONPATH=$PYTHONPATH_BASE:$PWD timeout 285 python3 -m experiments.benchmark $B --out=$OUT/v24e_before.jsonl 2>&1 | grep -v "^W1\|^I1" | grep -E "tok/s|Error|device" | cut -c1-200 | tee $OUT/v24e_before.log)
timeout 285 python3 -m experiments.benchmark $B --out=$OUT/v24e_after.jsonl 2>&1 | grep -v "^W1\|^I1" | grep -E "tok/s|Error|device" | cut -c1-200 | tee $OUT/v24e_after.log
