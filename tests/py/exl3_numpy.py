"""An independent numpy EXL3 decoder (TRELLIS.md §1-§3: state windows, MCG codebook, tensor-core walk order,
128-block Hadamards): an implementation of the spec independent of trellm's C++. tests/py/test_quantize.py checks
trellm's files with it; scripts/exl3_weight_error.py measures weight error with it. numpy only."""
import numpy as np

MCG_MUL = 0xCBAC1FED


def states_of(trellis):
    """(tk, tn, 16K) int16 -> (tk, tn, 256) 16-bit states, §1.3 and §2.1."""
    tk, tn, l16 = trellis.shape
    K = l16 // 16
    u16 = np.ascontiguousarray(trellis).view(np.uint16).reshape(tk, tn, 8 * K, 2).astype(np.uint64)
    words = (u16[..., 1] << np.uint64(16)) | u16[..., 0]  # element 2m+1 holds the high half of word m
    p = np.arange(256)
    b_end = (p + 1) * K + 256 * K
    i1, i0 = (b_end - 1) // 32, (b_end - 16) // 32
    shift = (32 * (i1 + 1) - b_end).astype(np.uint64)
    both = (words[..., i0 % (8 * K)] << np.uint64(32)) | words[..., i1 % (8 * K)]
    return (both >> shift) & np.uint64(0xFFFF)


def mcg(states):
    x = (states.astype(np.uint64) * np.uint64(MCG_MUL)) & np.uint64(0xFFFFFFFF)
    x = (x & np.uint64(0x8FFF8FFF)) ^ np.uint64(0x3B603B60)
    lo = (x & np.uint64(0xFFFF)).astype(np.uint16).view(np.float16).astype(np.float32)
    hi = (x >> np.uint64(16)).astype(np.uint16).view(np.float16).astype(np.float32)
    return (lo + hi).astype(np.float16)  # the exact sum rounded once = fp16 add (§8.6)


def unwalk(vals):
    """(tk, tn, 256) in walk order -> (16 tk, 16 tn) matrix (§1.2)."""
    tk, tn, _ = vals.shape
    p = np.arange(256)
    t, j = p // 8, p % 8
    rows = 2 * (t % 4) + np.array([0, 1, 8, 9, 0, 1, 8, 9])[j]
    cols = t // 4 + np.where(j >= 4, 8, 0)
    tiles = np.zeros((tk, tn, 16, 16), np.float32)
    tiles[:, :, rows, cols] = vals
    return tiles.transpose(0, 2, 1, 3).reshape(tk * 16, tn * 16)


def hadamard128():
    i = np.arange(128)
    pc = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    return np.where(pc % 2 == 0, 1.0, -1.0) / np.sqrt(128.0)


def dequantize(t, key):
    """W (in_p, out_p) = diag(suh) Hblk Q Hblk diag(svh) (§3)."""
    assert key + ".mcg" in t, "this test writes MCG"
    q = unwalk(mcg(states_of(t[key + ".trellis"])).astype(np.float32)).astype(np.float64)
    h = hadamard128()
    kp, np_ = q.shape
    q = np.einsum("ij,bjn->bin", h, q.reshape(kp // 128, 128, np_)).reshape(kp, np_)
    q = np.einsum("kbj,ji->kbi", q.reshape(kp, np_ // 128, 128), h).reshape(kp, np_)
    return t[key + ".suh"].astype(np.float64)[:, None] * q * t[key + ".svh"].astype(np.float64)[None, :]
