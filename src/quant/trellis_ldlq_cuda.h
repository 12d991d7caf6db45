// CUDA twin of quantize_ldlq_batch (trellis_encode.h): the same block steps with the same fp32 operations in the same
// order (rows = w + prod, err = w - recon, prod = fma(L[r0+j, i], err[j], prod) for j = 0..15 with zeros of L
// skipped), the Viterbi through ViterbiLane::encode, so the codes are the CPU's bit for bit.
// Compiled only when CUDA is found (TRELLM_HAVE_CUDA); test_trellis_ldlq_cuda compares it with the CPU.
#pragma once
#include <cstdint>
#include <span>

#include "quant/trellis_decode.h"

namespace trellm::trellis {

// Host pointers in and out, as quantize_ldlq_batch. For the k/16 steps the encoder's device (viterbi_cuda_use_device)
// holds every weight, factor, running product, reconstruction and code: 4 x 4 k n + 4 k^2 bytes a weight (64 routed
// experts of GLM-4.7-Flash, 2048 x 1536 each: 4.3 GB). Fails naming that size when it does not fit.
// With h (the rotated Hessians H', k x k each) also writes proxy[b] = tr(Eᵀ H' E) / tr(Wᵀ H' W), E = W - Ŵ, from two
// cuBLAS fp32 GEMMs a weight (2 x 2 k^2 n flops; on the CPU this is the slowest part of the encoder after the
// Viterbi: it streams W and E once per row of H'). Not bit-identical to the CPU's sum (another order); the proxy is
// a diagnostic and no file holds it.
void quantize_ldlq_batch_cuda(std::span<const float* const> w, std::span<const float* const> l, int64_t k, int64_t n,
                              int K, Codebook cb, std::span<uint16_t* const> states, std::span<float* const> recon,
                              std::span<const float* const> h = {}, std::span<double> proxy = {});

}  // namespace trellm::trellis
