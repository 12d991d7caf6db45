// Interleaved RoPE on the GPU, with the CPU backend's arithmetic (cpu::rope_rotate): f32 angle = f32(pos) *
// f32(inv_freq), inv_freq from a double pow, cos/sin in double, the rotation in f32. Shared by the rope and cache
// append kernels (kernels_elementwise.cu) and the MLA decode kernel that folds them in (mla_decode.cu).
#pragma once

namespace trellm::cuda {

// (a, b) = pair i of a `dim`-wide rope vector at position pos, rotated in place.
__device__ __forceinline__ void rope_rotate(float& a, float& b, int i, int dim, int pos, float theta) {
  const float inv_freq = float(1.0 / pow(double(theta), double(2 * i) / double(dim)));
  const float ang = float(pos) * inv_freq;
  double sn, cs;
  sincos(double(ang), &sn, &cs);
  const float c = float(cs), s = float(sn);
  const float x = a, y = b;
  a = x * c - y * s;
  b = y * c + x * s;
}

}  // namespace trellm::cuda
