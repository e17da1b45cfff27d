"""nnx layers: the memory layer (Titans, TTT, LaCT, TNT), its configs and presets, norms, conv."""

from tnt_jax.layers.configs import (PRESETS, LaCTLayerConfig, MemoryLayerConfig, TitansLayerConfig,
                                    TNTLayerConfig, TTTLayerConfig, preset)
from tnt_jax.layers.memory_layer import MemoryLayer, count_params
