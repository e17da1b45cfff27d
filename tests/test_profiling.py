"""The device-time split of a profile: interval arithmetic by hand, and the parser on an XSpace
written as a text proto (the format jax.profiler saves), with overlapping compute and NCCL
kernels on two streams of two GPUs."""

from absl.testing import absltest
import jax

from tnt_jax import profiling


def _xspace(devices: dict) -> str:
  """devices: plane name -> {line name: [(kernel name, start_ns, duration_ns)]}."""
  planes = []
  for plane_name, lines in devices.items():
    names = sorted({e[0] for events in lines.values() for e in events})
    ids = {n: i + 1 for i, n in enumerate(names)}
    metadata = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }} '
                       for n, i in ids.items())
    body = ""
    for line_id, (line_name, events) in enumerate(lines.items()):
      evs = "".join(f"events {{ metadata_id: {ids[n]} offset_ps: {s * 1000} "
                    f"duration_ps: {d * 1000} }} " for n, s, d in events)
      body += f'lines {{ id: {line_id} name: "{line_name}" timestamp_ns: 0 {evs}}} '
    planes.append(f'planes {{ name: "{plane_name}" {body}{metadata}}}')
  return " ".join(planes)


class ProfilingTest(absltest.TestCase):

  def test_interval_arithmetic(self):
    a = profiling.union([(5, 7), (0, 2), (1, 3), (6, 9)])
    self.assertEqual(a, [(0, 3), (5, 9)])
    self.assertEqual(profiling.length(a), 7)
    self.assertEqual(profiling.subtract(a, [(1, 2), (4, 6), (8, 20)]),
                     [(0, 1), (2, 3), (6, 8)])
    self.assertEqual(profiling.subtract(a, []), a)

  def test_split_of_a_two_gpu_trace(self):
    gpu0 = {"Stream #7(compute)": [("fusion_1", 0, 100), ("gemm", 150, 50)],
            "Stream #9(nccl)": [("ncclDevKernel_AllGather_RING_LL", 80, 40),     # 20 exposed
                                ("ncclDevKernel_ReduceScatter", 300, 10)],       # all exposed
            "XLA Ops": [("all-gather-start", 0, 1000)]}                         # not a kernel
    gpu1 = {"Stream #7(compute)": [("fusion_1", 0, 200)],
            "Stream #9(nccl)": [("ncclDevKernel_SendRecv", 50, 100)]}           # all hidden
    text = _xspace({"/device:GPU:0": gpu0, "/device:GPU:1": gpu1,
                    "/host:CPU": {"python": [("ncclFake", 0, 5000)]}})
    profile = jax.profiler.ProfileData.from_serialized_xspace(
        jax.profiler.ProfileData.text_proto_to_serialized_xspace(text))
    split = profiling.split_profile(profile, steps=2)
    self.assertEqual(split.devices, 2)
    # GPU 0: busy [0,120) + [150,200) + [300,310) = 180; comm 50; exposed 20 + 10 = 30.
    # GPU 1: busy 200, comm 100, exposed 0. Means over GPUs, per step (2), in ms.
    self.assertAlmostEqual(split.busy_ms, (180 + 200) / 2 / 2 / 1e6)
    self.assertAlmostEqual(split.comm_ms, (50 + 100) / 2 / 2 / 1e6)
    self.assertAlmostEqual(split.exposed_comm_ms, (30 + 0) / 2 / 2 / 1e6)
    first = profiling.split_profile(profile, steps=1, max_devices=1)   # GPU 0 alone
    self.assertEqual(first.devices, 1)
    self.assertAlmostEqual(first.busy_ms, 180 / 1e6)
    self.assertAlmostEqual(first.exposed_comm_ms, 30 / 1e6)

  def test_profile_of_a_real_step(self):
    fn = jax.jit(lambda x: x @ x)
    split = profiling.profile_step_split(fn, (jax.numpy.ones((256, 256)),))
    if jax.default_backend() == "cpu":   # CPU traces carry no per-kernel device events
      self.assertEqual(split.devices, 0)
    else:
      self.assertGreaterEqual(split.devices, 1)
      self.assertGreater(split.busy_ms, 0)

  def test_hlo_origins_name_the_jax_op_behind_a_kernel(self):
    hlo = "\n".join([
        "ENTRY %main (p: f32[8,4]) -> (f32[4,8], f32[4]) {",
        '  %input_transpose_fusion.2 = f32[4,8]{1,0} fusion(%p), kind=kInput, '
        'metadata={op_name="jit(f)/transpose(jvp(tnt_op))/transpose" stack_frame_id=3}, '
        'backend_config={"fusion":"x"}',
        "  ROOT %tuple.1 = (f32[4,8]{1,0}, f32[4]{0}) tuple(%input_transpose_fusion.2, %r)",
        "}"])
    origins = profiling.hlo_origins(hlo, ["input_transpose_fusion_2", "tuple_1", "cutlass_x"])
    self.assertEqual(origins["input_transpose_fusion_2"],
                     "f32[4,8]{1,0} fusion jit(f)/transpose(jvp(tnt_op))/transpose")
    self.assertEqual(origins["tuple_1"], "(f32[4,8]{1,0}, f32[4]{0}) tuple")   # no metadata
    self.assertNotIn("cutlass_x", origins)                                    # not in the HLO

  def test_hlo_origins_of_a_compiled_function(self):
    compiled = jax.jit(lambda x: jax.numpy.tanh(x).sum(0)).lower(
        jax.numpy.ones((16, 16))).compile()
    hlo = compiled.as_text()
    names = [m.group(1).replace(".", "_") for m in map(profiling._HLO_INSTRUCTION.match,
                                                       hlo.splitlines()) if m]
    origins = profiling.hlo_origins(hlo, names)
    self.assertEqual(set(origins), set(names))
    self.assertTrue(any("reduce_sum" in o or "tanh" in o for o in origins.values()), origins)

  def test_step_summary_sorts_kernels_by_kind_and_names_their_origin(self):
    gpu0 = {"Stream #7(compute)": [("body_mosaic_gpu_kernel", 0, 600),
                                   ("gemm_fusion_dot_3", 600, 200),
                                   ("input_reduce_fusion_1", 800, 100),
                                   ("cudnn_generated_fort_native_sdpa", 900, 50),
                                   ("body_mosaic_gpu_kernel", 1000, 600)]}
    text = _xspace({"/device:GPU:0": gpu0})
    profile = jax.profiler.ProfileData.from_serialized_xspace(
        jax.profiler.ProfileData.text_proto_to_serialized_xspace(text))
    hlo = ('  %input_reduce_fusion.1 = f32[4]{0} fusion(%p), kind=kInput, '
           'metadata={op_name="jit(step)/reduce_sum"}')
    summary = profiling.step_summary(profile, steps=2, hlo_text=hlo, wall_ms=0.002)
    lines = summary.splitlines()
    # Per step: busy 1550 ns / 2; the Mosaic kernel 600 of 775 ns, named first.
    self.assertIn("device busy 0.00 ms per step of 0.00 ms wall (39%)", lines[0])
    self.assertRegex(lines[1], r"77\.4%  fused memory kernels \(Pallas\)")
    self.assertRegex(lines[2], r"12\.9%  matmuls")
    self.assertRegex(lines[3], r"6\.5%  XLA's other kernels")
    self.assertRegex(lines[4], r"3\.2%  attention \(cuDNN\)")
    self.assertIn("x1     body_mosaic_gpu_kernel", summary)   # 2 launches in 2 steps
    self.assertIn("f32[4]{0} fusion jit(step)/reduce_sum", summary)

  def test_step_summary_of_a_trace_without_kernels(self):
    profile = jax.profiler.ProfileData.from_serialized_xspace(
        jax.profiler.ProfileData.text_proto_to_serialized_xspace(
            _xspace({"/host:CPU": {"python": [("f", 0, 5)]}})))
    self.assertIn("no device kernels", profiling.step_summary(profile, steps=1))


if __name__ == "__main__":
  absltest.main()
