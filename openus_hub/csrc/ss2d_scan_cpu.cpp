// Fused four-direction selective scan of an SS2D block (VMamba "v05_noz"), forward and backward, for CPUs.
//
// Plain C++ on raw float pointers. It includes no torch header and calls nothing from the C++ runtime library
// (posix_memalign/free/memcpy/memset from libc only; built with -fno-exceptions -fno-rtti), so one build serves every
// torch version and compiles in a second or two. openus_hub/ops/build.py compiles and caches it;
// openus_hub/ops/cpu_scan.py loads it with ctypes and wraps it in a torch custom op (autograd and torch.compile see an
// ordinary operator).
//
// Why a kernel: the selective scan is a recurrence over the L = H * W positions (3136 at stage 0 of a 224x224 image).
// In PyTorch it is a Python loop over L or a chunked formulation that moves several times the data. Here one loop walks
// each of the four scan directions over a channel-last map, vectorised over 16 channels, and adds each direction's
// output into the row-major result as it goes: the cross-scan and cross-merge copies never exist in memory.
//
// Layouts (float32, contiguous; p = h * W + w is the row-major position, K = 4 directions, N = d_state):
//   u      (B, L, D)       the scanned input, shared by the four directions
//   dt     (K, B * L, Dp)  step sizes before bias and softplus; channels zero-padded to Dp = 16 * ceil(D / 16)
//   bias   (K, D)          step-size bias
//   bc     (B, L, K, 2N)   per-direction input projection B (first N values) and output projection C (last N)
//   A      (K, D, N)       state matrix (negative: A = -exp(A_log))
//   Dskip  (K, D)          skip weights
//   y      (B, L, D)       output: the sum over the four directions, at row-major positions
//
// Scan orders: step l of direction k visits position order_k(l):
//   k = 0: l (row-major); k = 1: (l % H) * W + l / H (column-major); k = 2, 3: directions 0, 1 reversed.
//
// The recurrence, for direction k, image b, channel d, state n and step l (position p = order_k(l)):
//   x(l)     = dt[k, b, p, d] + bias[k, d]
//   delta(l) = softplus(x(l)) = log(1 + exp(x(l)))
//   h_n(l)   = exp(delta(l) * A[k, d, n]) * h_n(l - 1) + delta(l) * B_n(p) * u[b, p, d],        h_n(-1) = 0
//   y[b, p, d] += sum_n C_n(p) * h_n(l) + Dskip[k, d] * u[b, p, d]
// This equals cross_merge(selective_scan_reference(cross_scan(u), ...)) in openus_hub/ops (the PyTorch definition).
//
// Backward (reverse-mode derivation; gy = dLoss/dy, a_n(l) = exp(delta(l) * A_n)). Walking l from L - 1 down to 0
// with g_n(l) = dLoss/dh_n(l):
//   g_n(l)          = gy[p] * C_n(p) + a_n(l + 1) * g_n(l + 1)       (the second term is carried from step l + 1)
//   dLoss/dC_n(p)   = sum_d gy[p] * h_n(l)                            (C is shared by the channels)
//   dLoss/dB_n(p)   = sum_d g_n(l) * delta(l) * u[p]
//   dLoss/du[p]    += sum_n g_n(l) * delta(l) * B_n(p) + Dskip * gy[p]   (summed over the four directions)
//   dLoss/ddelta(l) = sum_n g_n(l) * (A_n * a_n(l) * h_n(l - 1) + B_n(p) * u[p])
//   dLoss/dA_n     += g_n(l) * delta(l) * a_n(l) * h_n(l - 1)
//   dLoss/dDskip   += gy[p] * u[p]
//   dLoss/ddt[p]    = dLoss/ddelta(l) * sigmoid(x(l))                 (softplus' = sigmoid)
//   dLoss/dbias     = sum over images and positions of dLoss/ddt
// The forward states h(l) of one direction are kept in a buffer (L + 1 per state) and read back in reverse.
//
// Parallelism: one task = one image b and one block of 16 channels, all four directions; tasks are independent, so
// results do not depend on the thread count. Sums across tasks (dLoss/dB, dC over channel blocks; dLoss/dA, dDskip
// over images) are written as per-task partials and reduced by the caller, in a fixed order.
//
// Explicit SIMD: GCC/Clang vector extensions with 8 float lanes (one AVX register, two SSE/NEON registers), two
// vectors per task. The build flags (openus_hub/ops/build.py) are fixed per ISA level, never -march=native, so an
// AVX2 machine and an AVX-512 machine run the same instructions and get the same bits.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef _OPENMP
#include <pthread.h>
#endif

namespace {

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int64_t VL = 8;           // float lanes per vector
constexpr int64_t NV = 2;           // vectors per task
constexpr int64_t DBLK = VL * NV;   // channels per task
constexpr int64_t K = 4;            // scan directions

inline vf vset(float a) { return vf{} + a; }
inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof(vf)); return v; }
inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof(vf)); }
inline float vsum(vf v) {
  float s = 0.f;
  for (int64_t i = 0; i < VL; ++i) s += v[i];
  return s;
}

// exp(x), Cephes expf polynomial (about 2 ulp); x is clamped to [-87, 88] so the result stays a normal float.
inline vf vexp(vf x) {
  x = x < vset(-87.f) ? vset(-87.f) : x;
  x = x > vset(88.f) ? vset(88.f) : x;
  const vf magic = vset(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf fx = (x * 1.44269504088896341f + magic) - magic;  // round(x / ln 2)
  vf g = x - fx * 0.693359375f;                             // x - fx * ln 2, in two parts (Cody-Waite)
  g = g + fx * 2.12194440e-4f;
  const vf z = g * g;
  const vf y = (((((1.9875691500e-4f * g + 1.3981999507e-3f) * g + 8.3334519073e-3f) * g + 4.1665795894e-2f) * g +
                 1.6666665459e-1f) * g + 5.0000001201e-1f) * z + g + 1.f;
  const vi bits = (__builtin_convertvector(fx, vi) + 127) << 23;  // 2^fx
  return y * (vf)bits;
}

// log(x) for x in [1, 2] (Cephes logf).
inline vf vlog12(vf x) {
  vi bits = (vi)x;
  vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  vf m = (vf)bits;
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

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)); rounding 1 + exp(-|x|) costs at most 6e-8 absolute.
inline vf vsoftplus(vf x) {
  const vf ax = x < vset(0.f) ? -x : x;
  const vf pos = x > vset(0.f) ? x : vset(0.f);
  return pos + vlog12(1.f + vexp(-ax));
}

inline vf vsigmoid(vf x) { return 1.f / (1.f + vexp(-x)); }

// Aligned scratch memory; ok() is false when the allocation failed.
template <class T>
struct Buffer {
  T* p = nullptr;
  explicit Buffer(int64_t n) {
    void* q = nullptr;
    if (n > 0 && posix_memalign(&q, 64, static_cast<size_t>(n) * sizeof(T)) == 0) p = static_cast<T*>(q);
  }
  ~Buffer() { free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  bool ok() const { return p != nullptr; }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
};

struct Args {
  const float *u, *dt, *bias, *bc, *A, *Dskip, *gy;  // gy: backward only
  float *y;                                          // forward output
  float *gu, *gdt, *gbc, *gA, *gD;                   // backward outputs (gbc, gA, gD: per-task partials)
  int64_t B, H, W, L, D, Dp, N, nblk;
  const int32_t* order;                              // (K, L) scan orders
};

// Direction-k parameters of the channel block [d0, d0 + nd). Lanes past nd are zero, and so are their inputs (u and
// the padded dt channels), so every loop runs over the full block and the padded lanes stay exactly zero.
struct Params {
  vf* a;  // (N, NV): A
  vf bias[NV], dskip[NV];
  void load(const Args& g, int64_t k, int64_t d0, int64_t nd) {
    float tmp[DBLK];
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t i = 0; i < DBLK; ++i) tmp[i] = i < nd ? g.A[(k * g.D + d0 + i) * g.N + n] : 0.f;
      for (int64_t j = 0; j < NV; ++j) a[n * NV + j] = vload(tmp + j * VL);
    }
    for (int64_t i = 0; i < DBLK; ++i) tmp[i] = i < nd ? g.Dskip[k * g.D + d0 + i] : 0.f;
    for (int64_t j = 0; j < NV; ++j) dskip[j] = vload(tmp + j * VL);
    for (int64_t i = 0; i < DBLK; ++i) tmp[i] = i < nd ? g.bias[k * g.D + d0 + i] : 0.f;
    for (int64_t j = 0; j < NV; ++j) bias[j] = vload(tmp + j * VL);
  }
};

// x = dt + bias and delta = softplus(x) for one step of one channel block.
inline void step_delta(const float* dtp, const Params& prm, vf* x, vf* delta) {
  for (int64_t j = 0; j < NV; ++j) {
    x[j] = vload(dtp + j * VL) + prm.bias[j];
    delta[j] = vsoftplus(x[j]);
  }
}

// Copy channels [d0, d0 + nd) of image b of a (B, L, D) tensor into a zero-padded (L, DBLK) buffer, and back.
void gather_block(const float* src, const Args& g, int64_t b, int64_t d0, int64_t nd, float* dst) {
  for (int64_t p = 0; p < g.L; ++p) {
    const float* s = src + (b * g.L + p) * g.D + d0;
    float* d = dst + p * DBLK;
    memcpy(d, s, nd * sizeof(float));
    if (nd < DBLK) memset(d + nd, 0, (DBLK - nd) * sizeof(float));
  }
}
void scatter_block(const float* src, const Args& g, int64_t b, int64_t d0, int64_t nd, float* dst) {
  for (int64_t p = 0; p < g.L; ++p) memcpy(dst + (b * g.L + p) * g.D + d0, src + p * DBLK, nd * sizeof(float));
}

// ---------------------------------------------------------------------------------------------------------------
// Forward. One worker per thread owns its scratch; run(task) scans image b = task / nblk, channel block task % nblk.
struct ForwardWorker {
  const Args& g;
  Buffer<float> ub, yb;  // (L, DBLK): this task's u, and its output accumulated over the four directions
  Buffer<vf> h, a;       // (N, NV): state, A
  explicit ForwardWorker(const Args& args)
      : g(args), ub(args.L * DBLK), yb(args.L * DBLK), h(args.N * NV), a(args.N * NV) {}
  bool ok() const { return ub.ok() && yb.ok() && h.ok() && a.ok(); }

  void run(int64_t task) {
    switch (g.N) {  // d_state fixed at compile time keeps the state in registers
      case 1: return scan<1>(task);
      case 2: return scan<2>(task);
      case 4: return scan<4>(task);
      case 8: return scan<8>(task);
      case 16: return scan<16>(task);
      default: return scan<0>(task);
    }
  }

  template <int64_t NS>
  void scan(int64_t task) {
    const int64_t N = NS > 0 ? NS : g.N, L = g.L, Dp = g.Dp;
    const int64_t b = task / g.nblk, d0 = (task % g.nblk) * DBLK, nd = g.D - d0 < DBLK ? g.D - d0 : DBLK;
    gather_block(g.u, g, b, d0, nd, ub.p);
    memset(yb.p, 0, L * DBLK * sizeof(float));
    Params prm{a.p, {}, {}};
    vf x[NV], delta[NV];
    for (int64_t k = 0; k < K; ++k) {
      prm.load(g, k, d0, nd);
      for (int64_t i = 0; i < N * NV; ++i) h[i] = vf{};
      const int32_t* order = g.order + k * L;
      const float* dtk = g.dt + (k * g.B + b) * L * Dp + d0;
      const float* bck = g.bc + (b * L * K + k) * 2 * N;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t p = order[l];
        const float* Bp = bck + p * K * 2 * N;  // B_n(p) = Bp[n], C_n(p) = Bp[N + n]
        step_delta(dtk + p * Dp, prm, x, delta);
        for (int64_t j = 0; j < NV; ++j) {
          const vf uj = vload(ub.p + p * DBLK + j * VL);
          vf yj = vload(yb.p + p * DBLK + j * VL) + prm.dskip[j] * uj;  // y += Dskip * u
          const vf du = delta[j] * uj;
          for (int64_t n = 0; n < N; ++n) {
            vf& hn = h[n * NV + j];
            hn = vexp(delta[j] * prm.a[n * NV + j]) * hn + du * Bp[n];  // h = exp(delta A) h + delta B u
            yj += hn * Bp[N + n];                                        // y += C h
          }
          vstore(yb.p + p * DBLK + j * VL, yj);
        }
      }
    }
    scatter_block(yb.p, g, b, d0, nd, g.y);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Backward: recompute the forward states of one direction, then walk back (derivation in the header comment).
struct BackwardWorker {
  const Args& g;
  Buffer<vf> hs, gh, ga, a;          // hs: (L + 1, N, NV), hs[l + 1] = h(l); gh, ga, a: (N, NV)
  Buffer<float> ub, gyb, gub;        // (L, DBLK): u, gy, and dLoss/du summed over the directions
  explicit BackwardWorker(const Args& args)
      : g(args), hs((args.L + 1) * args.N * NV), gh(args.N * NV), ga(args.N * NV), a(args.N * NV),
        ub(args.L * DBLK), gyb(args.L * DBLK), gub(args.L * DBLK) {}
  bool ok() const { return hs.ok() && gh.ok() && ga.ok() && a.ok() && ub.ok() && gyb.ok() && gub.ok(); }

  void run(int64_t task) {
    const int64_t L = g.L, D = g.D, Dp = g.Dp, N = g.N;
    const int64_t b = task / g.nblk, bi = task % g.nblk, d0 = bi * DBLK, nd = D - d0 < DBLK ? D - d0 : DBLK;
    gather_block(g.u, g, b, d0, nd, ub.p);
    gather_block(g.gy, g, b, d0, nd, gyb.p);
    memset(gub.p, 0, L * DBLK * sizeof(float));
    Params prm{a.p, {}, {}};
    vf x[NV], delta[NV], gdelta[NV], gdskip[NV];
    float tmp[DBLK];
    for (int64_t k = 0; k < K; ++k) {
      prm.load(g, k, d0, nd);
      const int32_t* order = g.order + k * L;
      const float* dtk = g.dt + (k * g.B + b) * L * Dp + d0;
      const float* bck = g.bc + (b * L * K + k) * 2 * N;
      // forward recurrence, keeping every state: hs[l + 1] = h(l)
      for (int64_t i = 0; i < N * NV; ++i) hs[i] = vf{};
      for (int64_t l = 0; l < L; ++l) {
        const int64_t p = order[l];
        const float* Bp = bck + p * K * 2 * N;
        step_delta(dtk + p * Dp, prm, x, delta);
        for (int64_t j = 0; j < NV; ++j) {
          const vf du = delta[j] * vload(ub.p + p * DBLK + j * VL);
          for (int64_t n = 0; n < N; ++n)
            hs[((l + 1) * N + n) * NV + j] = vexp(delta[j] * prm.a[n * NV + j]) * hs[(l * N + n) * NV + j] + du * Bp[n];
        }
      }
      // reverse pass: gh carries a(l + 1) * g(l + 1) back to step l
      for (int64_t i = 0; i < N * NV; ++i) gh[i] = ga[i] = vf{};
      for (int64_t j = 0; j < NV; ++j) gdskip[j] = vf{};
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t p = order[l];
        const float* Bp = bck + p * K * 2 * N;
        float* gBp = g.gbc + (((bi * g.B + b) * L + p) * K + k) * 2 * N;  // this task's partial dLoss/dB, dLoss/dC
        step_delta(dtk + p * Dp, prm, x, delta);
        for (int64_t j = 0; j < NV; ++j) {
          const vf uj = vload(ub.p + p * DBLK + j * VL), gyj = vload(gyb.p + p * DBLK + j * VL);
          gdelta[j] = vf{};
          gdskip[j] += gyj * uj;                                           // dLoss/dDskip += gy u
          vstore(gub.p + p * DBLK + j * VL, vload(gub.p + p * DBLK + j * VL) + gyj * prm.dskip[j]);
        }
        for (int64_t n = 0; n < N; ++n) {
          const float Bn = Bp[n], Cn = Bp[N + n];
          vf gC = vf{}, gB = vf{};
          for (int64_t j = 0; j < NV; ++j) {
            const vf uj = vload(ub.p + p * DBLK + j * VL), gyj = vload(gyb.p + p * DBLK + j * VL);
            const vf an = prm.a[n * NV + j], hprev = hs[(l * N + n) * NV + j], hl = hs[((l + 1) * N + n) * NV + j];
            const vf decay = vexp(delta[j] * an);
            const vf gn = gh[n * NV + j] + gyj * Cn;                         // g_n(l)
            gC += gyj * hl;                                                  // dLoss/dC_n += gy h
            gdelta[j] += gn * (an * decay * hprev + Bn * uj);               // dLoss/ddelta
            ga[n * NV + j] += gn * delta[j] * decay * hprev;                 // dLoss/dA_n
            gB += gn * delta[j] * uj;                                        // dLoss/dB_n += g delta u
            vstore(gub.p + p * DBLK + j * VL, vload(gub.p + p * DBLK + j * VL) + gn * delta[j] * Bn);
            gh[n * NV + j] = gn * decay;                                     // carried to step l - 1
          }
          gBp[n] = vsum(gB);  // each (task, p, k) is visited once: plain writes, no zeroing needed
          gBp[N + n] = vsum(gC);
        }
        float* gdtp = g.gdt + ((k * g.B + b) * L + p) * Dp + d0;  // padded channels get exact zeros
        for (int64_t j = 0; j < NV; ++j) vstore(gdtp + j * VL, gdelta[j] * vsigmoid(x[j]));
      }
      for (int64_t j = 0; j < NV; ++j) vstore(tmp + j * VL, gdskip[j]);
      memcpy(g.gD + (b * K + k) * D + d0, tmp, nd * sizeof(float));
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = 0; j < NV; ++j) vstore(tmp + j * VL, ga[n * NV + j]);
        for (int64_t i = 0; i < nd; ++i) g.gA[((b * K + k) * D + d0 + i) * N + n] = tmp[i];
      }
    }
    scatter_block(gub.p, g, b, d0, nd, g.gu);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Run tasks 0..ntasks-1 on up to nthreads threads, one Worker (and its scratch) per thread. Returns 0, or 2 when a
// worker could not allocate its scratch.
#ifndef _OPENMP
template <class Worker>
struct PoolState {
  const Args* g;
  int64_t ntasks;
  int64_t next;  // next task, taken with __atomic_fetch_add
  int failed;
};

template <class Worker>
void* pool_loop(void* arg) {
  auto* st = static_cast<PoolState<Worker>*>(arg);
  Worker w(*st->g);
  if (!w.ok()) {
    __atomic_store_n(&st->failed, 1, __ATOMIC_RELAXED);
    return nullptr;
  }
  for (int64_t t; (t = __atomic_fetch_add(&st->next, 1, __ATOMIC_RELAXED)) < st->ntasks;) w.run(t);
  return nullptr;
}
#endif

template <class Worker>
int run_tasks(const Args& g, int64_t ntasks, int nthreads) {
  if (nthreads < 1) nthreads = 1;
  if (nthreads > ntasks) nthreads = static_cast<int>(ntasks);
  int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) reduction(|| : failed)
  {
    Worker w(g);
    failed = !w.ok();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t)
      if (!failed) w.run(t);
  }
#else
  PoolState<Worker> st{&g, ntasks, 0, 0};
  pthread_t threads[256];
  int started = 0;
  for (int i = 1; i < nthreads && i < 256; ++i)
    if (pthread_create(&threads[started], nullptr, pool_loop<Worker>, &st) == 0) ++started;
  pool_loop<Worker>(&st);
  for (int i = 0; i < started; ++i) pthread_join(threads[i], nullptr);
  failed = st.failed;
#endif
  return failed ? 2 : 0;
}

Args make_args(const float* u, const float* dt, const float* bias, const float* bc, const float* A, const float* Dskip,
               int64_t B, int64_t H, int64_t W, int64_t D, int64_t N, const int32_t* order) {
  Args g{};
  g.u = u; g.dt = dt; g.bias = bias; g.bc = bc; g.A = A; g.Dskip = Dskip;
  g.B = B; g.H = H; g.W = W; g.L = H * W; g.D = D; g.N = N;
  g.nblk = (D + DBLK - 1) / DBLK;
  g.Dp = g.nblk * DBLK;
  g.order = order;
  return g;
}

// order[k * L + l]: the row-major position visited at step l of direction k.
void fill_scan_orders(int64_t H, int64_t W, int32_t* order) {
  const int64_t L = H * W;
  for (int64_t l = 0; l < L; ++l) {
    const int32_t col = static_cast<int32_t>((l % H) * W + l / H);
    order[l] = static_cast<int32_t>(l);
    order[L + l] = col;
    order[2 * L + L - 1 - l] = static_cast<int32_t>(l);
    order[3 * L + L - 1 - l] = col;
  }
}

bool bad_sizes(int64_t B, int64_t H, int64_t W, int64_t D, int64_t N) {
  return B < 1 || H < 1 || W < 1 || D < 1 || N < 1 || H * W > INT32_MAX;
}

}  // namespace

extern "C" {

// Bumped whenever a signature below changes; openus_hub/ops/cpu_scan.py refuses a library with another version.
int openus_ss2d_abi_version(void) { return 1; }

// 1 when built with OpenMP (multi-threaded through OpenMP), 0 for the pthread build.
int openus_ss2d_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Forward: writes y (B, L, D). Returns 0, 1 for invalid sizes, 2 when scratch memory could not be allocated.
int openus_ss2d_scan_fwd(const float* u, const float* dt, const float* bias, const float* bc, const float* A,
                         const float* Dskip, float* y, int64_t B, int64_t H, int64_t W, int64_t D, int64_t N,
                         int num_threads) {
  if (bad_sizes(B, H, W, D, N)) return 1;
  Buffer<int32_t> order(4 * H * W);
  if (!order.ok()) return 2;
  fill_scan_orders(H, W, order.p);
  Args g = make_args(u, dt, bias, bc, A, Dskip, B, H, W, D, N, order.p);
  g.y = y;
  return run_tasks<ForwardWorker>(g, B * g.nblk, num_threads);
}

// Backward: writes gu (B, L, D), gdt (K, B * L, Dp) and the partial sums gbc (nblk, B, L, K, 2N), gA (B, K, D, N),
// gD (B, K, D); the caller sums gbc over its first axis and gA, gD over images (and gdt over B * L for the bias).
int openus_ss2d_scan_bwd(const float* gy, const float* u, const float* dt, const float* bias, const float* bc,
                         const float* A, const float* Dskip, float* gu, float* gdt, float* gbc, float* gA, float* gD,
                         int64_t B, int64_t H, int64_t W, int64_t D, int64_t N, int num_threads) {
  if (bad_sizes(B, H, W, D, N)) return 1;
  Buffer<int32_t> order(4 * H * W);
  if (!order.ok()) return 2;
  fill_scan_orders(H, W, order.p);
  Args g = make_args(u, dt, bias, bc, A, Dskip, B, H, W, D, N, order.p);
  g.gy = gy; g.gu = gu; g.gdt = gdt; g.gbc = gbc; g.gA = gA; g.gD = gD;
  return run_tasks<BackwardWorker>(g, B * g.nblk, num_threads);
}

}  // extern "C"
