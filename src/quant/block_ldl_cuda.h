// CUDA twin of block_ldl (block_ldl.h) for a batch of Hessians of one size: the same Crout order and the same
// double operations, one rounding each (no fused multiply-add on either side: block_ldl.cpp is compiled with
// -ffp-contract=off, the kernels use __dmul_rn / __dadd_rn), so the factors are the CPU's bit for bit. On the
// host the block LDL of a layer's 64 expert Hessians (2048 x 2048) took 1.8-3.9 s of all 16 cores of the H200's
// host, as long as the scale search and competing with it (bench/results/quantize_full.md); here ~1 s with the GPU
// otherwise idle (H200, 2026-12-03, quantize --trace).
// Compiled only when CUDA is found (TRELLM_HAVE_CUDA); test_block_ldl_cuda compares it with the CPU.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace trellm::trellis {

// h[b]: n x n row-major f32 (n % 16 == 0; the lower triangle is read), the undamped first attempt of block_ldl;
// l[b]: n x n f32 out, block_ldl's factor. Returns ok[b]: false where that Cholesky met a pivot that is not positive
// (l[b] is then unspecified: the caller runs block_ldl with its damping retries for that one). On the encoder's
// device (viterbi_cuda_current_device), on a stream of its own; working memory up to ~4 GiB (~12 B per element and
// Hessian, as many Hessians at once as fit).
std::vector<bool> block_ldl_batch_cuda(std::span<const float* const> h, int64_t n, std::span<float* const> l);

}  // namespace trellm::trellis
