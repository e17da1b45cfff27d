import time, sys, jax, jax.numpy as jnp, numpy as np
print(jax.__version__, jax.devices())
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule, Gates
from tnt_jax.ops.api import memory_op
from tnt_jax.kernels.chunk_memory import kernel_memory, KernelBlocks
def inputs(cfg, b, t, h, d, dt):
  ks = jax.random.split(jax.random.key(0), 8)
  n = lambda i, s: jax.random.normal(ks[i], s, dt)
  q, k, v = n(0,(b,t,h,d)), n(1,(b,t,h,d)), n(2,(b,t,h,d))
  q = q/jnp.linalg.norm(q.astype(jnp.float32),axis=-1,keepdims=True).astype(dt); k = k/jnp.linalg.norm(k.astype(jnp.float32),axis=-1,keepdims=True).astype(dt)
  g = lambda i, sc: sc*jax.nn.sigmoid(jax.random.normal(ks[i],(b,t,h)))
  need = cfg.rule.required_gates()
  gates = Gates(g(3,.2), g(4,1.) if "eta" in need else None, g(5,.3) if "alpha" in need else None)
  w = cfg.model.init_fast_weights(ks[6], h, d)
  return q,k,v,gates,cfg.init_state(w,b)
def bench(f, *a, n=5):
  r = f(*a); jax.block_until_ready(r)
  t0=time.perf_counter()
  for _ in range(n): r = f(*a)
  jax.block_until_ready(r); return (time.perf_counter()-t0)/n*1e3
for kind, exp in [("linear",1.0),("mlp",4.0)]:
  for rule, read in [("gd","cumulative"),("titans","cumulative"),("gd","chunk_start")]:
    for C in [16, 64]:
      for nw in [4, 8]:
        cfg = MemoryConfig(model=MemoryModel(kind, depth=2, expansion=exp), rule=UpdateRule(rule), read=read, chunk_size=C)
        a = inputs(cfg, 4, 8192, 12, 64, jnp.bfloat16)
        try:
          fk = jax.jit(lambda q,k,v,g,s: kernel_memory(q,k,v,g,s,cfg,blocks=KernelBlocks(num_warps=nw)))
          fx = jax.jit(lambda q,k,v,g,s: memory_op(q,k,v,g,s,{},cfg))
          ok, ox = fk(*a), fx(*a)
          err = float(jnp.linalg.norm((ok[0]-ox[0]).astype(jnp.float32))/jnp.linalg.norm(ox[0].astype(jnp.float32)))
          print(kind, rule, read, C, nw, f"err {err:.2e} kernel {bench(fk,*a):.2f} ms xla {bench(fx,*a):.2f} ms", flush=True)
        except Exception as e:
          print(kind, rule, read, C, nw, "FAIL", type(e).__name__, str(e)[:1500], flush=True)
