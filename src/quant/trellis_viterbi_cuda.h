// CUDA twin of trellis_viterbi.h: the same two-pass tail-biting Viterbi with the same fp32 arithmetic
// (d = cb - w, c = fma(d, d, pred)) and the same tie-breaking (lowest k, then lowest node index for the pass-1 end
// node), so its states must equal the CPU encoder's bit for bit. K = 2..6 run the fast kernels (one tile per
// 1024-thread block, codebook values in registers, costs in shared memory: trellis_viterbi_fast.h,
// docs/kernels.md "Trellis Viterbi encoder"); K = 1, 7, 8 a generic kernel.
// Compiled only when CUDA is found (TRELLM_HAVE_CUDA); tests labelled `cuda` compare it with the CPU.
#pragma once
#include <cstdint>

#include "quant/trellis_decode.h"

namespace trellm::trellis {

// True when a CUDA device is present (tests skip otherwise).
bool viterbi_cuda_available();

// Host pointers in and out (it copies): w n x 256 (walk order), states n x 256, recon n x 256 or nullptr.
// Works through the tiles in chunks sized to a scratch budget (fast kernels: cost rows of 1-8 MiB a tile, up to
// 4 GiB or 1/16 of the GPU's memory, chunks of whole waves; generic: ~1 GiB of backpointers, 256 * 2^(16-K) bytes a
// tile); the device buffers are kept for the next call (grown as needed, one set per lane: see ViterbiLane).
// Returns the total squared error. Throws trellm::Error on a CUDA failure. Callers that may run without CUDA use
// encode_tiles (trellis_viterbi.h).
double viterbi_encode_tiles_cuda(const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon);

// A share of the GPU encoder held by one caller: a CUDA stream (non-blocking) and the scratch buffers of the calls on
// it. Calls on different lanes run side by side on the GPU (the quantizer's batched LDLQ of up to three groups, and the
// scale search of later groups); viterbi_encode_tiles_cuda takes a lane of the normal class for each call. Urgent
// lanes' streams have the priority just under the device's greatest, which the block LDL keeps (the SMs go to their
// blocks before the normal lanes'). At most 3 lanes of each class
// exist; constructing a fourth waits until one is freed. The constructor puts the calling thread on the encoder's
// device (viterbi_cuda_current_device).
class ViterbiLane {
 public:
  explicit ViterbiLane(bool urgent);
  ~ViterbiLane();
  ViterbiLane(const ViterbiLane&) = delete;
  ViterbiLane& operator=(const ViterbiLane&) = delete;
  void* stream() const;  // the lane's cudaStream_t
  // viterbi_encode_tiles_cuda on device memory of the encoder's device: w n x 256 in, states n x 256 out, recon
  // n x 256 out or nullptr; no error sum. Enqueued on stream(), after the caller's work there and before its next;
  // returns without waiting. For callers that keep their matrices on the GPU (the batched LDLQ, trellis_ldlq_cuda.h).
  void encode(const float* w, int64_t n, int K, Codebook cb, uint16_t* states, float* recon);

 private:
  void* lane_;
};

// Frees every lane's kept device buffers (up to ~4 GiB each); the next call allocates them again. No lane may be held.
// For a process that goes on using the GPU after encoding, and for tests run under compute-sanitizer's leak check.
void viterbi_cuda_release();

// The CUDA device the encoder runs on from now on (default 0; `--device cuda:N`). Fails naming the devices there are
// when N is not one of them. Buffers kept on the previous device are freed.
int viterbi_cuda_device_count();
void viterbi_cuda_use_device(int gpu);
int viterbi_cuda_current_device();

}  // namespace trellm::trellis
