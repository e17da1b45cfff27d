"""Memory ops; import them through `tnt_jax.ops.api`."""
