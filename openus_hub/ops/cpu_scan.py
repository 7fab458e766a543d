"""Fused four-direction selective scan for CPU (a small C++ kernel compiled on first use).

Why a kernel: the selective scan is a recurrence over ``L`` (3136 steps at stage 0 of a 224x224 image). In PyTorch
it is either a Python loop over ``L`` or a chunked formulation that moves several times the data; both dominate the
forward time on a CPU. Here one C++ loop walks each of the four SS2D directions over a channel-last map, vectorised
over channels, and sums the four directions into the output as it goes, so the cross-scan and cross-merge copies
never exist in memory. The softplus of the step sizes is computed inside the loop.

Layouts (all float32, contiguous; ``p = h * W + w`` is the row-major position, ``K = 4`` directions):

* ``u``      ``(B, L, D)``        the scanned input, shared by the four directions
* ``dt``     ``(K, B*L, Dp)``     step sizes before bias and softplus, channels zero-padded to a multiple of 16:
  ``delta = softplus(dt + bias)``
* ``bias``   ``(K, D)``
* ``bc``     ``(B, L, K, 2N)``    per-direction B (first N) and C (last N)
* ``A``      ``(K, D, N)``;  ``Dskip`` ``(K, D)``
* returns ``y`` ``(B, L, D)`` = sum over directions of that direction's scan output, at row-major positions.

This equals ``cross_merge(selective_scan_reference(cross_scan(u), ...))`` (see ``ss2d.py``), which the tests check
forward and backward. Compilation needs a C++ compiler and ``ninja``; without them ``is_available()`` is False and
callers fall back to the PyTorch reference.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

__all__ = ["CHANNEL_BLOCK", "is_available", "fused_cross_scan_cpu"]

CHANNEL_BLOCK = 16  # channels per task in the kernel (DBLK); the step sizes are laid out in blocks of this size

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Explicit SIMD through GCC/Clang vector extensions: 8 float lanes (one AVX register, two SSE registers).
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int64_t VL = 8;              // lanes per vector
constexpr int64_t NV = 2;              // vectors per task
constexpr int64_t DBLK = VL * NV;      // channels per task

inline vf vset(float a) { return vf{} + a; }
inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline float vsum(vf v) {
  float s = 0.f;
  for (int64_t i = 0; i < VL; ++i) s += v[i];
  return s;
}

// exp(x) (Cephes polynomial, ~2 ulp); x is clamped to [-87, 88]
inline vf vexp(vf x) {
  x = x < vset(-87.f) ? vset(-87.f) : x;
  x = x > vset(88.f) ? vset(88.f) : x;
  const vf magic = vset(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf fx = (x * 1.44269504088896341f + magic) - magic;
  vf g = x - fx * 0.693359375f;
  g = g + fx * 2.12194440e-4f;
  const vf z = g * g;
  const vf y = (((((1.9875691500e-4f * g + 1.3981999507e-3f) * g + 8.3334519073e-3f) * g + 4.1665795894e-2f) * g +
                 1.6666665459e-1f) * g + 5.0000001201e-1f) * z + g + 1.f;
  const vi bits = (__builtin_convertvector(fx, vi) + 127) << 23;
  return y * reinterpret_cast<const vf&>(bits);
}

// log(x) for x in [1, 2] (Cephes logf)
inline vf vlog12(vf x) {
  vi bits = reinterpret_cast<const vi&>(x);
  vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  vf m = reinterpret_cast<const vf&>(bits);
  const auto small = m < vset(0.707106781186547524f);
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  const vf z = m * m;
  vf y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m +
              1.4249322787e-1f) * m - 1.6668057665e-1f) * m + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m +
         3.3333331174e-1f) * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + e * 0.693359375f;
}

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)); the rounding of 1 + t costs at most 6e-8 absolute
inline vf vsoftplus(vf x) {
  const vf ax = x < vset(0.f) ? -x : x;
  const vf pos = x > vset(0.f) ? x : vset(0.f);
  return pos + vlog12(1.f + vexp(-ax));
}

inline vf vsigmoid(vf x) { return 1.f / (1.f + vexp(-x)); }

// order[k * L + l]: row-major position visited at step l of direction k (row, column, and both reversed)
std::vector<int32_t> scan_orders(int64_t H, int64_t W) {
  const int64_t L = H * W;
  std::vector<int32_t> order(4 * L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t col = (l % H) * W + l / H;
    order[l] = l;
    order[L + l] = col;
    order[2 * L + L - 1 - l] = l;
    order[3 * L + L - 1 - l] = col;
  }
  return order;
}

struct Inputs {
  const float *u, *dt, *bias, *bc, *A, *Dskip;
  int64_t Bn, L, D, K, N;
};

Inputs make_inputs(const torch::Tensor& u, const torch::Tensor& dt, const torch::Tensor& bias, const torch::Tensor& bc,
                   const torch::Tensor& A, const torch::Tensor& Dskip) {
  Inputs in{u.data_ptr<float>(), dt.data_ptr<float>(), bias.data_ptr<float>(), bc.data_ptr<float>(),
            A.data_ptr<float>(), Dskip.data_ptr<float>(), u.size(0), u.size(1), u.size(2), dt.size(0), A.size(2)};
  TORCH_CHECK(in.K == 4 && bc.size(2) == 4, "fused scan: expected 4 directions");
  TORCH_CHECK(dt.dim() == 3 && dt.size(1) == in.Bn * in.L && dt.size(2) == (in.D + DBLK - 1) / DBLK * DBLK,
              "fused scan: dt must be (4, B * L, D rounded up to a multiple of 16)");
  TORCH_CHECK(bc.size(3) == 2 * in.N, "fused scan: bc must hold B then C (2 * d_state values)");
  return in;
}

// Direction-k parameters of one channel block [d0, d0 + nd); lanes past nd are zero, and so are their inputs, so
// every loop runs over the full block.
struct Block {
  std::vector<vf> a;  // (N, NV) state matrix
  vf bias[NV], dskip[NV];
  explicit Block(const Inputs& in) : a(in.N * NV) {}
  void load(const Inputs& in, int64_t k, int64_t d0, int64_t nd) {
    float tmp[DBLK];
    auto gather = [&](auto&& value, vf* dst) {
      for (int64_t i = 0; i < DBLK; ++i) tmp[i] = i < nd ? value(d0 + i) : 0.f;
      for (int64_t j = 0; j < NV; ++j) dst[j] = vload(tmp + j * VL);
    };
    for (int64_t n = 0; n < in.N; ++n) gather([&](int64_t d) { return in.A[(k * in.D + d) * in.N + n]; }, &a[n * NV]);
    gather([&](int64_t d) { return in.Dskip[k * in.D + d]; }, dskip);
    gather([&](int64_t d) { return in.bias[k * in.D + d]; }, bias);
  }
};

// pre-activation x = dt[k, b, p, block] + bias and delta = softplus(x), for one step
inline void step_delta(const float* xp, const Block& blk, vf* x, vf* dl) {
  for (int64_t j = 0; j < NV; ++j) {
    x[j] = vload(xp + j * VL) + blk.bias[j];
    dl[j] = vsoftplus(x[j]);
  }
}

// copy channels [d0, d0 + nd) of a (B, L, D) tensor into a zero-padded (L, DBLK) buffer, and back
void gather_block(const float* src, int64_t b, int64_t L, int64_t D, int64_t d0, int64_t nd, float* dst) {
  for (int64_t p = 0; p < L; ++p) {
    const float* s = src + (b * L + p) * D + d0;
    float* d = dst + p * DBLK;
    if (nd == DBLK) {
      for (int64_t j = 0; j < NV; ++j) vstore(d + j * VL, vload(s + j * VL));
    } else {
      std::memcpy(d, s, nd * sizeof(float));
      std::fill(d + nd, d + DBLK, 0.f);
    }
  }
}
void scatter_block(const float* src, int64_t b, int64_t L, int64_t D, int64_t d0, int64_t nd, float* dst) {
  for (int64_t p = 0; p < L; ++p) {
    const float* s = src + p * DBLK;
    float* d = dst + (b * L + p) * D + d0;
    if (nd == DBLK) {
      for (int64_t j = 0; j < NV; ++j) vstore(d + j * VL, vload(s + j * VL));
    } else {
      std::memcpy(d, s, nd * sizeof(float));
    }
  }
}

}  // namespace

namespace {

// One task of the forward: channels [d0, d0 + nd) of image b, all four directions. NS > 0 fixes d_state at
// compile time (the state then lives in registers); NS == 0 handles any d_state.
template <int64_t NS>
void scan_fwd_task(const Inputs& in, const int32_t* order, int64_t b, int64_t bi, float* ub, float* yb, vf* h,
                   Block& blk, float* py) {
  const int64_t Bn = in.Bn, L = in.L, D = in.D, K = in.K, N = NS > 0 ? NS : in.N;
  const int64_t Dp = (D + DBLK - 1) / DBLK * DBLK, d0 = bi * DBLK, nd = std::min(DBLK, D - d0);
  gather_block(in.u, b, L, D, d0, nd, ub);
  std::fill(yb, yb + L * DBLK, 0.f);
  vf x[NV], dl[NV];
  for (int64_t k = 0; k < K; ++k) {
    blk.load(in, k, d0, nd);
    std::fill(h, h + N * NV, vf{});
    const int32_t* ord = order + k * L;
    const float* dtk = in.dt + (k * Bn + b) * L * Dp + d0;
    const float* bck = in.bc + b * L * K * 2 * N + k * 2 * N;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t p = ord[l];
      const float* bcp = bck + p * K * 2 * N;
      step_delta(dtk + p * Dp, blk, x, dl);
      for (int64_t j = 0; j < NV; ++j) {
        const vf uj = vload(ub + p * DBLK + j * VL);
        vf yj = vload(yb + p * DBLK + j * VL) + blk.dskip[j] * uj;
        const vf du = dl[j] * uj;
        for (int64_t n = 0; n < N; ++n) {
          vf& hn = h[n * NV + j];
          hn = vexp(dl[j] * blk.a[n * NV + j]) * hn + du * bcp[n];
          yj += hn * bcp[N + n];
        }
        vstore(yb + p * DBLK + j * VL, yj);
      }
    }
  }
  scatter_block(yb, b, L, D, d0, nd, py);
}

}  // namespace

// y (B, L, D) = sum over the 4 directions of the selective scan of u; direction k uses
// delta = softplus(dt[k] + bias[k]), B = bc[..., k, :N] and C = bc[..., k, N:]. dt is (K, B * L, Dp) with the
// channels zero-padded to a whole number of blocks, so every task reads full vectors.
torch::Tensor scan_fwd(torch::Tensor u, torch::Tensor dt, torch::Tensor bias, torch::Tensor bc, torch::Tensor A,
                       torch::Tensor Dskip, int64_t H, int64_t W) {
  const Inputs in = make_inputs(u, dt, bias, bc, A, Dskip);
  TORCH_CHECK(in.L == H * W, "fused scan: L != H * W");
  const auto order = scan_orders(H, W);
  auto y = torch::empty_like(u);
  float* py = y.data_ptr<float>();
  const int64_t nblk = (in.D + DBLK - 1) / DBLK;
  at::parallel_for(0, in.Bn * nblk, 1, [&](int64_t begin, int64_t end) {
    // the task's slice of u and its output live in these cache-resident buffers, not in strided memory
    std::vector<float> ub(in.L * DBLK), yb(in.L * DBLK);
    std::vector<vf> h(in.N * NV);
    Block blk(in);
    for (int64_t task = begin; task < end; ++task) {
      if (in.N == 1)
        scan_fwd_task<1>(in, order.data(), task / nblk, task % nblk, ub.data(), yb.data(), h.data(), blk, py);
      else
        scan_fwd_task<0>(in, order.data(), task / nblk, task % nblk, ub.data(), yb.data(), h.data(), blk, py);
    }
  });
  return y;
}

// gradients: u (B, L, D), dt (K, B * L, Dp), bias (K, D), bc (B, L, K, 2N), A (K, D, N), Dskip (K, D)
std::vector<torch::Tensor> scan_bwd(torch::Tensor gy, torch::Tensor u, torch::Tensor dt, torch::Tensor bias,
                                    torch::Tensor bc, torch::Tensor A, torch::Tensor Dskip, int64_t H, int64_t W) {
  const Inputs in = make_inputs(u, dt, bias, bc, A, Dskip);
  const auto order = scan_orders(H, W);
  const int64_t Bn = in.Bn, L = in.L, D = in.D, K = in.K, N = in.N, nblk = (D + DBLK - 1) / DBLK, Dp = nblk * DBLK;
  auto gu = torch::empty_like(u);
  auto gdt = torch::empty_like(dt);  // padded channels get exact zeros
  // per-channel-block / per-batch partial sums, reduced below (no atomics, deterministic)
  auto gbc = torch::zeros({nblk, Bn, L, K, 2 * N}, u.options());
  auto gA = torch::zeros({Bn, K, D, N}, u.options());
  auto gD = torch::zeros({Bn, K, D}, u.options());
  const float* pgy = gy.data_ptr<float>();
  float *pgu = gu.data_ptr<float>(), *pgdt = gdt.data_ptr<float>(), *pgbc = gbc.data_ptr<float>(),
        *pgA = gA.data_ptr<float>(), *pgD = gD.data_ptr<float>();
  at::parallel_for(0, Bn * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<vf> hs((L + 1) * N * NV), gh(N * NV), ga(N * NV);  // hs[l + 1] = state after step l
    std::vector<float> ub(L * DBLK), gub(L * DBLK), gyb(L * DBLK), tmp(DBLK);
    Block blk(in);
    vf x[NV], dl[NV], gdl[NV], gd[NV];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, bi = task % nblk, d0 = bi * DBLK, nd = std::min(DBLK, D - d0);
      gather_block(in.u, b, L, D, d0, nd, ub.data());
      gather_block(pgy, b, L, D, d0, nd, gyb.data());
      std::fill(gub.begin(), gub.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        blk.load(in, k, d0, nd);
        const int32_t* ord = order.data() + k * L;
        std::fill(hs.begin(), hs.begin() + N * NV, vf{});
        for (int64_t l = 0; l < L; ++l) {  // forward recurrence, keeping every state
          const int64_t p = ord[l];
          const float* bcp = in.bc + ((b * L + p) * K + k) * 2 * N;
          step_delta(in.dt + ((k * Bn + b) * L + p) * Dp + d0, blk, x, dl);
          for (int64_t j = 0; j < NV; ++j) {
            const vf du = dl[j] * vload(&ub[p * DBLK + j * VL]);
            for (int64_t n = 0; n < N; ++n)
              hs[((l + 1) * N + n) * NV + j] =
                  vexp(dl[j] * blk.a[n * NV + j]) * hs[(l * N + n) * NV + j] + du * bcp[n];
          }
        }
        // reverse pass; gh carries dLoss/dh(t) back from step t + 1
        std::fill(gh.begin(), gh.end(), vf{});
        std::fill(ga.begin(), ga.end(), vf{});
        for (int64_t j = 0; j < NV; ++j) gd[j] = vf{};
        for (int64_t l = L - 1; l >= 0; --l) {
          const int64_t p = ord[l];
          const float* bcp = in.bc + ((b * L + p) * K + k) * 2 * N;
          float* gbcp = pgbc + (((bi * Bn + b) * L + p) * K + k) * 2 * N;
          step_delta(in.dt + ((k * Bn + b) * L + p) * Dp + d0, blk, x, dl);
          for (int64_t j = 0; j < NV; ++j) {
            const vf uj = vload(&ub[p * DBLK + j * VL]), gyj = vload(&gyb[p * DBLK + j * VL]);
            gdl[j] = vf{};
            gd[j] += gyj * uj;
            vstore(&gub[p * DBLK + j * VL], vload(&gub[p * DBLK + j * VL]) + gyj * blk.dskip[j]);
          }
          for (int64_t n = 0; n < N; ++n) {
            const float bn = bcp[n], cn = bcp[N + n];
            vf sum_gc = vf{}, sum_gb = vf{};
            for (int64_t j = 0; j < NV; ++j) {
              const vf uj = vload(&ub[p * DBLK + j * VL]), gyj = vload(&gyb[p * DBLK + j * VL]);
              const vf an = blk.a[n * NV + j], hp = hs[(l * N + n) * NV + j], hn = hs[((l + 1) * N + n) * NV + j];
              const vf decay = vexp(dl[j] * an);
              const vf g = gh[n * NV + j] + gyj * cn;  // dLoss/dh(t)
              sum_gc += gyj * hn;
              gdl[j] += g * (an * decay * hp + bn * uj);
              ga[n * NV + j] += g * dl[j] * decay * hp;
              sum_gb += g * dl[j] * uj;
              vstore(&gub[p * DBLK + j * VL], vload(&gub[p * DBLK + j * VL]) + g * dl[j] * bn);
              gh[n * NV + j] = g * decay;
            }
            gbcp[n] += vsum(sum_gb);
            gbcp[N + n] += vsum(sum_gc);
          }
          float* gdtp = pgdt + ((k * Bn + b) * L + p) * Dp + d0;
          for (int64_t j = 0; j < NV; ++j) vstore(gdtp + j * VL, gdl[j] * vsigmoid(x[j]));
        }
        for (int64_t j = 0; j < NV; ++j) vstore(&tmp[j * VL], gd[j]);
        std::memcpy(pgD + (b * K + k) * D + d0, tmp.data(), nd * sizeof(float));
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t j = 0; j < NV; ++j) vstore(&tmp[j * VL], ga[n * NV + j]);
          for (int64_t i = 0; i < nd; ++i) pgA[((b * K + k) * D + d0 + i) * N + n] = tmp[i];
        }
      }
      scatter_block(gub.data(), b, L, D, d0, nd, pgu);
    }
  });
  auto gbias = gdt.sum(1).narrow(1, 0, D);
  return {gu, gdt, gbias, gbc.sum(0), gA.sum(0), gD.sum(0)};
}
"""

_CPP_DECLS = r"""
torch::Tensor scan_fwd(torch::Tensor u, torch::Tensor dt, torch::Tensor bias, torch::Tensor bc, torch::Tensor A,
                       torch::Tensor Dskip, int64_t H, int64_t W);
std::vector<torch::Tensor> scan_bwd(torch::Tensor gy, torch::Tensor u, torch::Tensor dt, torch::Tensor bias,
                                    torch::Tensor bc, torch::Tensor A, torch::Tensor Dskip, int64_t H, int64_t W);
"""

_lock = threading.Lock()
_module = None
_failed: str | None = None


def _isa_flags() -> list[str]:
    """Vector ISA flags this CPU supports (the compiled module is cached per flag set)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    if "avx2" in flags and "fma" in flags:
        return ["-mavx2", "-mfma"]
    return []


def _load():
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("OPENUS_HUB_DISABLE_CPU_KERNEL", "") not in ("", "0"):
            _failed = "disabled by OPENUS_HUB_DISABLE_CPU_KERNEL"
            return None
        try:
            from torch.utils.cpp_extension import load_inline
        except Exception as err:
            _failed = f"{type(err).__name__}: {err}"
        else:
            isa = _isa_flags()
            # at::parallel_for is OpenMP in headers: without -fopenmp the kernel would run on one thread. Compilers
            # without OpenMP (e.g. Apple clang) get the single-threaded build instead.
            for parallel in (["-fopenmp"], []):
                name = "openus_hub_cpu_scan_v15" + ("_avx2" if isa else "") + ("_omp" if parallel else "")
                logger.info("compiling the OpenUS CPU scan kernel (%s, once per machine)", name)
                try:
                    _module = load_inline(
                        name=name,
                        cpp_sources=[_CPP_DECLS + _CPP_SOURCE],
                        functions=["scan_fwd", "scan_bwd"],
                        extra_cflags=["-O3", *isa, *parallel],
                        extra_ldflags=parallel,
                        verbose=False,
                    )
                    _failed = None
                    break
                except Exception as err:  # no compiler, no ninja, no OpenMP, read-only cache, ...
                    _failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if _module is None:
            logger.warning(
                "OpenUS CPU scan kernel unavailable (%s); using the slower PyTorch reference scan. "
                "Install a C++ compiler and `pip install ninja` for the fast path.",
                _failed,
            )
    return _module


def is_available() -> bool:
    """True when the fused CPU kernel compiled (or was already cached) on this machine."""
    return _load() is not None


# The kernel is a torch custom op (with fake tensors for shapes), so torch.compile traces through it.
def _define_ops():
    try:
        @torch.library.custom_op("openus_hub::ss2d_scan_fwd", mutates_args=(), device_types="cpu")
        def scan_fwd(u: torch.Tensor, dt: torch.Tensor, bias: torch.Tensor, bc: torch.Tensor, A: torch.Tensor,
                     Dskip: torch.Tensor, height: int, width: int) -> torch.Tensor:
            return _module.scan_fwd(u, dt, bias, bc, A, Dskip, height, width)

        @torch.library.custom_op("openus_hub::ss2d_scan_bwd", mutates_args=(), device_types="cpu")
        def scan_bwd(gy: torch.Tensor, u: torch.Tensor, dt: torch.Tensor, bias: torch.Tensor, bc: torch.Tensor,
                     A: torch.Tensor, Dskip: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
            return list(_module.scan_bwd(gy, u, dt, bias, bc, A, Dskip, height, width))
    except RuntimeError:  # already defined in this process (e.g. by a remote-code copy of this file)
        return torch.ops.openus_hub.ss2d_scan_fwd, torch.ops.openus_hub.ss2d_scan_bwd

    @scan_fwd.register_fake
    def _(u, dt, bias, bc, A, Dskip, height, width):
        return torch.empty_like(u)

    @scan_bwd.register_fake
    def _(gy, u, dt, bias, bc, A, Dskip, height, width):
        return [torch.empty_like(u), torch.empty_like(dt), torch.empty_like(bias), torch.empty_like(bc),
                torch.empty_like(A), torch.empty_like(Dskip)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.hw = inputs[6:]

    def backward(ctx, gy):
        grads = scan_bwd(gy.contiguous(), *ctx.saved_tensors, *ctx.hw)
        return (*grads, None, None)

    scan_fwd.register_autograd(backward, setup_context=setup_context)
    return scan_fwd, scan_bwd


_scan_fwd_op, _scan_bwd_op = _define_ops()


def fused_cross_scan_cpu(
    u: torch.Tensor,
    dt: torch.Tensor,
    bias: torch.Tensor,
    bc: torch.Tensor,
    A: torch.Tensor,
    Dskip: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Four-direction selective scan summed over directions; layouts in the module docstring. Differentiable."""
    if _load() is None:
        raise RuntimeError(f"the OpenUS CPU scan kernel is unavailable: {_failed}")
    tensors = [t.float().contiguous() for t in (u, dt, bias, bc, A, Dskip)]
    return _scan_fwd_op(*tensors, height, width)
