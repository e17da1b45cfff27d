"""tnt_jax: deep test-time memory language models (Titans, TTT, LaCT, TNT) in JAX."""

from setuptools import find_packages, setup

setup(
    name="tnt_jax",
    version="0.1.0",
    description="Deep test-time memory LMs trained the TNT way, in JAX/Flax",
    packages=find_packages(include=["tnt_jax", "tnt_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",  # nnx.List and nnx.data
        "optax",
        "orbax-checkpoint",
        "grain",
        "chex",
        "absl-py",
        "ml_collections",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        # jax[tpu] brings libtpu, which compiles the kernels for TPUs on any host (tnt_jax/aot.py).
        "test": ["pytest", "pytest-xdist",
                 "jax[tpu]; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        "tpu": ["jax[tpu]"],
    },
)
