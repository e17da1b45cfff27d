"""MemoryModel.from_spec and the layer configs that take a model as a string."""

from absl.testing import absltest, parameterized

from tnt_jax.layers.configs import TITANS_MEMORY, TitansLayerConfig, TNTLayerConfig
from tnt_jax.memory.models import MemoryModel


class MemoryModelSpecTest(parameterized.TestCase):

  @parameterized.parameters(
      ("mlp", TITANS_MEMORY),
      ("linear", MemoryModel("linear")),
      ("swiglu+expansion=1", MemoryModel("swiglu", expansion=1.0)),
      ("mlp+depth=3+activation=silu+bias=true+residual_norm=1",
       MemoryModel("mlp", depth=3, activation="silu", bias=True, residual_norm=True)))
  def test_spec(self, spec, want):
    self.assertEqual(MemoryModel.from_spec(spec), want)

  @parameterized.parameters(
      ("lstm", "kind='lstm' is unknown"),
      ("mlp+width=3", "'width=3' must be field=value with field in"),
      ("mlp+expansion", "'expansion' must be field=value"),
      ("mlp+expansion=big", "expansion='big' is not a float"),
      ("mlp+bias=maybe", "bias='maybe' is not a bool"),
      ("mlp+depth=1", "depth >= 2"))
  def test_bad_spec_names_the_value(self, spec, message):
    with self.assertRaisesRegex(ValueError, message):
      MemoryModel.from_spec(spec)

  def test_layer_configs_take_a_spec_string(self):
    common = dict(d_model=64, num_heads=4, head_dim=16)
    tnt = TNTLayerConfig(global_chunk=64, shard_lengths=64, local_chunks=(8,),
                         global_model="linear", local_model="mlp+expansion=2", **common)
    memories = tnt.memory_config()
    self.assertEqual(memories.global_memory.model, MemoryModel("linear"))
    self.assertEqual(memories.local_memories[0].memory.model, MemoryModel("mlp", expansion=2.0))
    titans = TitansLayerConfig(model="swiglu", **common)
    self.assertEqual(titans.memory_config().global_memory.model, MemoryModel("swiglu"))
    with self.assertRaisesRegex(ValueError, "model=3 must be a MemoryModel or its spec string"):
      TitansLayerConfig(model=3, **common)


if __name__ == "__main__":
  absltest.main()
