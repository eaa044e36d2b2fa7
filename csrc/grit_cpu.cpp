// C++ CPU kernels of the GRIT ops, registered as torch.library ops in namespace ``grit_kernels_cpp``.
//
// One translation unit (compile time matters): the op schemas (TORCH_LIBRARY), the CPU
// implementations (TORCH_LIBRARY_IMPL ... CPU) and an empty Python module ``_C`` so that
// ``import grit_kernels._C`` loads the library. The CUDA implementations live in grit_cuda.cu.
//
// Ops (shapes and semantics: grit_kernels/ops/*.py; oracle: grit_kernels/reference.py):
//   accumulate_gram_(out[r,r], x[..., r], weight)            out += weight * x2^T x2
//   ema_fold_(factor[n,R,R], stat_sum[n,R,R], weight[n], decay, initialized[n])
//   damped_cholesky_inverse(mats[n,R,R], damping, eps_abs, ranks[n], previous?, previous_valid?,
//                           retry_factor) -> (inverses[n,R,R], status[n] int32)
//   precondition_(grads_a[M], grads_b[M], inv_d[M',R,R], inv_h[M',R,R], compute_dot) -> dot (0-dim f32)
//
// Math in float32 (float64 when the tensors are float64, for the oracle tests); gradients and
// activations may be bfloat16 / float16 and are converted tile by tile. Parallel over matrices,
// modules and gradient chunks with at::parallel_for; every reduction is summed in a fixed chunk
// order, so results do not depend on the thread count.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

// The hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64; the loader picks one at run time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define GRIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GRIT_CLONES
#endif

// 16 floats: one AVX-512 register, two AVX2 ones; GCC/Clang vector extensions lower it for each clone.
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));  // unaligned access
#define GRIT_LOAD(p) (*reinterpret_cast<const v16f_u*>(p))
#define GRIT_STORE(p, v) (*reinterpret_cast<v16f_u*>(p) = (v))

extern "C" {
// ``import grit_kernels._C`` runs the static TORCH_LIBRARY registrations below; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace grit {
namespace {

// Status codes of grit_kernels/status.py (InverseStatus).
constexpr int32_t kOk = 0, kRetried = 1, kKeptPrevious = 2, kScaledIdentity = 3;

template <typename T>
T to_t(T v) { return v; }
inline float to_t(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_t(c10::Half v) { return static_cast<float>(v); }

// ------------------------------------------------------------------------------------- Gram
// acc[r, rw] (row stride rw = r rounded up to 16) += sum_t x[t, :]^T x[t, :] over ``rows`` rows of a
// converted, zero-padded tile x[rows, rw]. Blocks of 8 accumulator rows x 16 columns stay in registers.
template <typename T>
GRIT_CLONES void gram_tile(const T* __restrict x, int64_t rows, int r, int rw, T* __restrict acc) {
  constexpr int IB = 8, W = 16;
  for (int i0 = 0; i0 < r; i0 += IB) {
    const int ib = std::min(IB, r - i0);
    for (int j0 = 0; j0 < rw; j0 += W) {
      T a[IB][W] = {};
      for (int64_t t = 0; t < rows; ++t) {
        const T* xt = x + t * rw;
        for (int b = 0; b < IB; ++b) {
          const T s = b < ib ? xt[i0 + b] : T(0);
          for (int j = 0; j < W; ++j) a[b][j] += s * xt[j0 + j];
        }
      }
      for (int b = 0; b < ib; ++b)
        for (int j = 0; j < W; ++j) acc[(i0 + b) * rw + j0 + j] += a[b][j];
    }
  }
}

template <>
GRIT_CLONES void gram_tile<float>(const float* __restrict x, int64_t rows, int r, int rw, float* __restrict acc) {
  constexpr int IB = 16;
  for (int i0 = 0; i0 < r; i0 += IB) {
    const int ib = std::min(IB, r - i0);
    for (int j0 = 0; j0 < rw; j0 += 16) {
      v16f a[IB] = {};
      for (int64_t t = 0; t < rows; ++t) {
        const float* xt = x + t * rw;
        const v16f xj = GRIT_LOAD(xt + j0);
        if (ib == IB) {
#pragma GCC unroll 16
          for (int b = 0; b < IB; ++b) a[b] += xt[i0 + b] * xj;
        } else {
          for (int b = 0; b < ib; ++b) a[b] += xt[i0 + b] * xj;
        }
      }
      for (int b = 0; b < ib; ++b) GRIT_STORE(acc + (i0 + b) * rw + j0, GRIT_LOAD(acc + (i0 + b) * rw + j0) + a[b]);
    }
  }
}

template <typename X, typename T>
void gram_impl(at::Tensor& out, const at::Tensor& x2, double weight) {
  const int64_t n = x2.size(0);
  const int r = static_cast<int>(x2.size(1));
  const int rw = (r + 15) / 16 * 16;
  constexpr int64_t kChunk = 512;  // rows per chunk: the converted tile stays in L2
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<T> partial(static_cast<size_t>(chunks) * r * rw, T(0));
  const X* xp = x2.data_ptr<X>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> tile;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * kChunk, rows = std::min(kChunk, n - t0);
      if constexpr (std::is_same_v<X, T>) {
        if (rw == r) {  // rows already in the compute type and tile layout: no copy
          gram_tile<T>(xp + t0 * r, rows, r, rw, partial.data() + c * r * rw);
          continue;
        }
      }
      tile.resize(static_cast<size_t>(kChunk) * rw, T(0));  // padding columns stay 0
      for (int64_t t = 0; t < rows; ++t)
        for (int j = 0; j < r; ++j) tile[t * rw + j] = to_t(xp[(t0 + t) * r + j]);
      gram_tile<T>(tile.data(), rows, r, rw, partial.data() + c * r * rw);
    }
  });
  auto o = out.accessor<T, 2>();
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < r; ++j) {
      T s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[(c * r + i) * rw + j];
      o[i][j] += static_cast<T>(weight) * s;
    }
}

void accumulate_gram_cpu(at::Tensor out, const at::Tensor& x, double weight) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == out.size(1) && x.size(-1) == out.size(0),
              "accumulate_gram_: out must be [r, r] and x [..., r]");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "accumulate_gram_: out must be float32 or float64");
  if (x.numel() == 0) return;
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "accumulate_gram_", [&] {
    using T = scalar_t;
    switch (x2.scalar_type()) {
      case at::kFloat: gram_impl<float, T>(out, x2, weight); break;
      case at::kDouble: gram_impl<double, T>(out, x2, weight); break;
      case at::kBFloat16: gram_impl<c10::BFloat16, T>(out, x2, weight); break;
      case at::kHalf: gram_impl<c10::Half, T>(out, x2, weight); break;
      default: TORCH_CHECK(false, "accumulate_gram_: x must be float32/64, bfloat16 or float16");
    }
  });
}

// ---------------------------------------------------------------------------------- EMA fold
void ema_fold_cpu(at::Tensor factor, const at::Tensor& stat_sum, const at::Tensor& weight, double decay,
                  at::Tensor initialized) {
  TORCH_CHECK(factor.dim() == 3 && stat_sum.sizes() == factor.sizes() && weight.dim() == 1 &&
                  weight.size(0) == factor.size(0) && initialized.numel() == factor.size(0),
              "ema_fold_: factor/stat_sum [n, R, R], weight [n], initialized [n]");
  TORCH_CHECK(factor.is_contiguous() && initialized.is_contiguous() && initialized.scalar_type() == at::kBool,
              "ema_fold_: factor and initialized (bool) must be contiguous");
  const int64_t n = factor.size(0), rr = factor.size(1) * factor.size(2);
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "ema_fold_", [&] {
    using T = scalar_t;
    const at::Tensor s = stat_sum.to(factor.scalar_type()).contiguous();
    const at::Tensor w = weight.to(factor.scalar_type()).contiguous();
    T* f = factor.data_ptr<T>();
    const T* sp = s.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    bool* init = initialized.data_ptr<bool>();
    const T beta = static_cast<T>(decay), one_minus = static_cast<T>(1.0 - decay);
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
      std::vector<T> step(rr);
      for (int64_t i = b; i < e; ++i) {
        bool ok = wp[i] != T(0);
        for (int64_t k = 0; k < rr; ++k) {
          step[k] = wp[i] * sp[i * rr + k];
          ok = ok && std::isfinite(step[k]);
        }
        if (!ok) continue;
        T* fi = f + i * rr;
        if (init[i])
          for (int64_t k = 0; k < rr; ++k) fi[k] = beta * fi[k] + one_minus * step[k];
        else
          for (int64_t k = 0; k < rr; ++k) fi[k] = step[k];
        init[i] = true;
      }
    });
  });
}

// ------------------------------------------------------------------------- damped inversion
// Cholesky of a[r, r] + lam I (row stride r) into l (lower); then inv = L^-T L^-1.
// Returns false on a non-positive or non-finite pivot, or a non-finite inverse.
template <typename T>
bool cholesky_inverse(const T* a, int r, T lam, T* l, T* inv) {
  std::fill(l, l + r * r, T(0));
  for (int j = 0; j < r; ++j) {
    T d = a[j * r + j] + lam;
    for (int k = 0; k < j; ++k) d -= l[j * r + k] * l[j * r + k];
    if (!(d > T(0)) || !std::isfinite(d)) return false;
    const T ljj = std::sqrt(d);
    l[j * r + j] = ljj;
    const T inv_ljj = T(1) / ljj;
    for (int i = j + 1; i < r; ++i) {
      T s = a[i * r + j];
      for (int k = 0; k < j; ++k) s -= l[i * r + k] * l[j * r + k];
      l[i * r + j] = s * inv_ljj;
    }
  }
  // L^-1 in place of the upper triangle's mirror: m = L^-1 (lower), by forward substitution per column.
  std::vector<T> m(static_cast<size_t>(r) * r, T(0));
  for (int j = 0; j < r; ++j) {
    m[j * r + j] = T(1) / l[j * r + j];
    for (int i = j + 1; i < r; ++i) {
      T s = 0;
      for (int k = j; k < i; ++k) s -= l[i * r + k] * m[k * r + j];
      m[i * r + j] = s / l[i * r + i];
    }
  }
  // inv[i][j] = sum_{k >= max(i, j)} m[k][i] m[k][j]: same products in the same order for (i, j) and
  // (j, i), so the result is exactly symmetric.
  std::fill(inv, inv + r * r, T(0));
  for (int k = 0; k < r; ++k) {
    const T* mk = m.data() + k * r;
    for (int i = 0; i <= k; ++i) {
      const T mi = mk[i];
      for (int j = 0; j <= k; ++j) inv[i * r + j] += mi * mk[j];
    }
  }
  for (int i = 0; i < r * r; ++i)
    if (!std::isfinite(inv[i])) return false;
  return true;
}

std::tuple<at::Tensor, at::Tensor> damped_cholesky_inverse_cpu(const at::Tensor& mats_in, double damping,
                                                                double eps_abs, const at::Tensor& ranks_in,
                                                                const c10::optional<at::Tensor>& previous_in,
                                                                const c10::optional<at::Tensor>& valid_in,
                                                                double retry_factor) {
  TORCH_CHECK(mats_in.dim() == 3 && mats_in.size(1) == mats_in.size(2), "damped_cholesky_inverse: mats [n, R, R]");
  TORCH_CHECK(mats_in.scalar_type() == at::kFloat || mats_in.scalar_type() == at::kDouble,
              "damped_cholesky_inverse: mats must be float32 or float64");
  const int64_t n = mats_in.size(0);
  const int R = static_cast<int>(mats_in.size(1));
  TORCH_CHECK(ranks_in.numel() == n, "damped_cholesky_inverse: ranks must be [n]");
  const at::Tensor mats = mats_in.contiguous();
  const at::Tensor ranks = ranks_in.to(at::kLong).contiguous();
  const bool has_prev = previous_in.has_value() && valid_in.has_value();
  at::Tensor previous, valid;
  if (has_prev) {
    previous = previous_in->to(mats.scalar_type()).contiguous();
    valid = valid_in->to(at::kBool).contiguous();
    TORCH_CHECK(previous.sizes() == mats.sizes() && valid.numel() == n,
                "damped_cholesky_inverse: previous [n, R, R] and previous_valid [n]");
  }
  at::Tensor out = at::empty_like(mats);
  at::Tensor status = at::empty({n}, mats.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(mats.scalar_type(), "damped_cholesky_inverse", [&] {
    using T = scalar_t;
    const T* mp = mats.data_ptr<T>();
    const int64_t* rp = ranks.data_ptr<int64_t>();
    const T* pp = has_prev ? previous.data_ptr<T>() : nullptr;
    const bool* vp = has_prev ? valid.data_ptr<bool>() : nullptr;
    T* op = out.data_ptr<T>();
    int32_t* sp = status.data_ptr<int32_t>();
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
      std::vector<T> a(R * R), l(R * R), inv(R * R);
      for (int64_t i = b; i < e; ++i) {
        const int r = static_cast<int>(std::min<int64_t>(std::max<int64_t>(rp[i], 1), R));
        const T* src = mp + i * R * R;
        bool finite = true;
        T trace = 0;
        for (int p = 0; p < r; ++p)
          for (int q = 0; q < r; ++q) {
            const T v = src[p * R + q];
            a[p * r + q] = v;
            finite = finite && std::isfinite(v);
          }
        for (int p = 0; p < r; ++p) trace += a[p * r + p];
        const T lam = static_cast<T>(damping) * trace / static_cast<T>(r) + static_cast<T>(eps_abs);
        finite = finite && std::isfinite(lam);
        int32_t code = kScaledIdentity;
        bool done = false;
        if (finite) {
          if (cholesky_inverse<T>(a.data(), r, lam, l.data(), inv.data())) {
            code = kOk, done = true;
          } else if (cholesky_inverse<T>(a.data(), r, lam * static_cast<T>(retry_factor), l.data(), inv.data())) {
            code = kRetried, done = true;
          }
        }
        if (!done && has_prev && vp[i]) {
          const T* prev = pp + i * R * R;
          for (int p = 0; p < r; ++p)
            for (int q = 0; q < r; ++q) inv[p * r + q] = prev[p * R + q];
          code = kKeptPrevious, done = true;
        }
        if (!done) {  // I / lam, or I if lam is not usable
          const bool usable = std::isfinite(lam) && lam > T(0);
          const T diag = usable ? T(1) / lam : T(1);
          std::fill(inv.begin(), inv.begin() + r * r, T(0));
          for (int p = 0; p < r; ++p) inv[p * r + p] = diag;
        }
        T* dst = op + i * R * R;
        for (int p = 0; p < R; ++p)
          for (int q = 0; q < R; ++q)
            dst[p * R + q] = (p < r && q < r) ? T(0.5) * (inv[p * r + q] + inv[q * r + p]) : T(p == q);
        sp[i] = code;
      }
    });
  });
  return {out, status};
}

// ----------------------------------------------------------------------------- precondition
// Left side (grad_A [r, d], row stride ld): g[:, c0:c1] <- P g[:, c0:c1], P = p[r, rw] (row stride rw).
// Tiles of 32 columns are converted to T; 4 output rows x 32 columns are accumulated in registers.
template <typename G, typename T>
GRIT_CLONES void left_chunk(G* __restrict g, int64_t ld, int r, int64_t c0, int64_t c1, const T* __restrict p,
                            int rw, T* __restrict tile, bool want_dot, double* dot_out) {
  constexpr int W = 32, IB = 4;
  double dot = 0;
  for (int64_t j0 = c0; j0 < c1; j0 += W) {
    const int w = static_cast<int>(std::min<int64_t>(W, c1 - j0));
    for (int k = 0; k < r; ++k)
      for (int j = 0; j < W; ++j) tile[k * W + j] = j < w ? to_t(g[k * ld + j0 + j]) : T(0);
    for (int i0 = 0; i0 < r; i0 += IB) {
      const int ib = std::min(IB, r - i0);
      T acc[IB][W] = {};
      for (int k = 0; k < r; ++k) {
        const T* tk = tile + k * W;
        for (int b = 0; b < IB; ++b) {
          const T s = b < ib ? p[(i0 + b) * rw + k] : T(0);
          for (int j = 0; j < W; ++j) acc[b][j] += s * tk[j];
        }
      }
      for (int b = 0; b < ib; ++b) {
        G* gi = g + (i0 + b) * ld + j0;
        if (want_dot) {
          T d = 0;
          for (int j = 0; j < W; ++j) d += acc[b][j] * tile[(i0 + b) * W + j];
          dot += d;
        }
        for (int j = 0; j < w; ++j) gi[j] = static_cast<G>(acc[b][j]);
      }
    }
  }
  *dot_out += dot;
}

// Right side (grad_B [d, r], row stride ld): g[r0:r1, :] <- g[r0:r1, :] P, P = p[r, rw] zero-padded to rw
// columns. Blocks of 8 rows are converted to T; 8 rows x 16 columns are accumulated in registers.
template <typename G, typename T>
GRIT_CLONES void right_chunk(G* __restrict g, int64_t ld, int r, int64_t r0, int64_t r1, const T* __restrict p,
                             int rw, T* __restrict tile, bool want_dot, double* dot_out) {
  constexpr int W = 16, IB = 8;
  double dot = 0;
  for (int64_t i0 = r0; i0 < r1; i0 += IB) {
    const int ib = static_cast<int>(std::min<int64_t>(IB, r1 - i0));
    for (int b = 0; b < IB; ++b)
      for (int k = 0; k < rw; ++k) tile[b * rw + k] = (b < ib && k < r) ? to_t(g[(i0 + b) * ld + k]) : T(0);
    for (int j0 = 0; j0 < rw; j0 += W) {
      T acc[IB][W] = {};
      for (int k = 0; k < r; ++k) {
        const T* pk = p + k * rw + j0;
        for (int b = 0; b < IB; ++b) {
          const T s = tile[b * rw + k];
          for (int j = 0; j < W; ++j) acc[b][j] += s * pk[j];
        }
      }
      for (int b = 0; b < ib; ++b) {
        const int w = std::min(W, r - j0);
        if (want_dot) {
          T d = 0;
          for (int j = 0; j < W; ++j) d += acc[b][j] * tile[b * rw + j0 + j];
          dot += d;
        }
        G* gi = g + (i0 + b) * ld + j0;
        for (int j = 0; j < w; ++j) gi[j] = static_cast<G>(acc[b][j]);
      }
    }
  }
  *dot_out += dot;
}

inline double hsum(v16f v) {
  double s = 0;
  for (int j = 0; j < 16; ++j) s += v[j];
  return s;
}

// float32 math, vector registers: left side 4 output rows x 32 columns, right side 8 rows x 16 columns.
template <typename G>
GRIT_CLONES void left_chunk_f32(G* __restrict g, int64_t ld, int r, int64_t c0, int64_t c1,
                                const float* __restrict p, int rw, float* __restrict tile, bool want_dot,
                                double* dot_out) {
  constexpr int W = 32, IB = 4;
  double dot = 0;
  for (int64_t j0 = c0; j0 < c1; j0 += W) {
    v16f dotv = {};
    const int w = static_cast<int>(std::min<int64_t>(W, c1 - j0));
    for (int k = 0; k < r; ++k) {
      const G* gk = g + k * ld + j0;
      float* tk = tile + k * W;
      if (w == W)
        for (int j = 0; j < W; ++j) tk[j] = to_t(gk[j]);
      else
        for (int j = 0; j < W; ++j) tk[j] = j < w ? to_t(gk[j]) : 0.0f;
    }
    for (int i0 = 0; i0 < r; i0 += IB) {
      const int ib = std::min(IB, r - i0);
      v16f lo[IB] = {}, hi[IB] = {};
      for (int k = 0; k < r; ++k) {
        const v16f t0 = GRIT_LOAD(tile + k * W), t1 = GRIT_LOAD(tile + k * W + 16);
#pragma GCC unroll 4
        for (int b = 0; b < IB; ++b) {
          const float s = b < ib ? p[(i0 + b) * rw + k] : 0.0f;
          lo[b] += s * t0;
          hi[b] += s * t1;
        }
      }
      for (int b = 0; b < ib; ++b) {
        const float* old = tile + (i0 + b) * W;
        if (want_dot) dotv += lo[b] * GRIT_LOAD(old) + hi[b] * GRIT_LOAD(old + 16);
        G* gi = g + (i0 + b) * ld + j0;
        if constexpr (std::is_same_v<G, float>) {
          if (w == W) {
            GRIT_STORE(gi, lo[b]);
            GRIT_STORE(gi + 16, hi[b]);
            continue;
          }
        }
        for (int j = 0; j < w; ++j) gi[j] = static_cast<G>(j < 16 ? lo[b][j] : hi[b][j - 16]);
      }
    }
    if (want_dot) dot += hsum(dotv);
  }
  *dot_out += dot;
}

template <typename G>
GRIT_CLONES void right_chunk_f32(G* __restrict g, int64_t ld, int r, int64_t r0, int64_t r1,
                                 const float* __restrict p, int rw, float* __restrict tile, bool want_dot,
                                 double* dot_out) {
  constexpr int IB = 8;
  double dot = 0;
  for (int64_t i0 = r0; i0 < r1; i0 += IB) {
    v16f dotv = {};
    const int ib = static_cast<int>(std::min<int64_t>(IB, r1 - i0));
    for (int b = 0; b < IB; ++b) {
      float* tb = tile + b * rw;
      const G* gb = g + (i0 + b) * ld;
      if (b < ib) {
        for (int k = 0; k < r; ++k) tb[k] = to_t(gb[k]);
        for (int k = r; k < rw; ++k) tb[k] = 0.0f;
      } else {
        for (int k = 0; k < rw; ++k) tb[k] = 0.0f;
      }
    }
    for (int j0 = 0; j0 < rw; j0 += 16) {
      v16f acc[IB] = {};
      for (int k = 0; k < r; ++k) {
        const v16f pk = GRIT_LOAD(p + k * rw + j0);
#pragma GCC unroll 8
        for (int b = 0; b < IB; ++b) acc[b] += tile[b * rw + k] * pk;
      }
      const int w = std::min(16, r - j0);
      for (int b = 0; b < ib; ++b) {
        if (want_dot) dotv += acc[b] * GRIT_LOAD(tile + b * rw + j0);
        G* gi = g + (i0 + b) * ld + j0;
        if constexpr (std::is_same_v<G, float>) {
          if (w == 16) {
            GRIT_STORE(gi, acc[b]);
            continue;
          }
        }
        for (int j = 0; j < w; ++j) gi[j] = static_cast<G>(acc[b][j]);
      }
    }
    if (want_dot) dot += hsum(dotv);
  }
  *dot_out += dot;
}

struct Chunk {
  int64_t grad;   // index into grads_a (left) or grads_b (right)
  bool left;
  int64_t begin, end;  // columns (left) or rows (right)
};

template <typename G, typename T>
void run_chunk(const at::Tensor& g, const at::Tensor& inv, int64_t module, const Chunk& c, std::vector<T>& p,
               std::vector<T>& tile, bool want_dot, double* dot) {
  const int r = static_cast<int>(c.left ? g.size(0) : g.size(1));
  const int R = static_cast<int>(inv.size(1));
  const int rw = (r + 15) / 16 * 16;
  p.assign(static_cast<size_t>(r) * rw, T(0));
  // P in T, zero-padded to rw columns (inverses are float32, or float64 in the oracle tests)
  if (inv.scalar_type() == at::kDouble) {
    const double* src = inv.data_ptr<double>() + module * R * R;
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < r; ++j) p[i * rw + j] = static_cast<T>(src[i * R + j]);
  } else {
    const float* src = inv.data_ptr<float>() + module * R * R;
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < r; ++j) p[i * rw + j] = static_cast<T>(src[i * R + j]);
  }
  tile.resize(std::max<size_t>(static_cast<size_t>(r) * 32, static_cast<size_t>(8) * rw));
  G* gp = g.data_ptr<G>();
  if constexpr (std::is_same_v<T, float>) {
    if (c.left)
      left_chunk_f32<G>(gp, g.stride(0), r, c.begin, c.end, p.data(), rw, tile.data(), want_dot, dot);
    else
      right_chunk_f32<G>(gp, g.stride(0), r, c.begin, c.end, p.data(), rw, tile.data(), want_dot, dot);
  } else if (c.left) {
    left_chunk<G, T>(gp, g.stride(0), r, c.begin, c.end, p.data(), rw, tile.data(), want_dot, dot);
  } else {
    right_chunk<G, T>(gp, g.stride(0), r, c.begin, c.end, p.data(), rw, tile.data(), want_dot, dot);
  }
}

at::Tensor precondition_cpu(at::TensorList grads_a, at::TensorList grads_b, const at::Tensor& inv_d_in,
                            const at::Tensor& inv_h_in, bool compute_dot) {
  const int64_t M = static_cast<int64_t>(grads_a.size());
  TORCH_CHECK(static_cast<int64_t>(grads_b.size()) == M && inv_d_in.dim() == 3 && inv_d_in.size(0) >= M &&
                  inv_h_in.sizes() == inv_d_in.sizes(),
              "precondition_: one lora_A and one lora_B grad per module and [M, R, R] inverses");
  TORCH_CHECK(inv_d_in.scalar_type() == at::kFloat || inv_d_in.scalar_type() == at::kDouble,
              "precondition_: inverses must be float32 or float64");
  const at::Tensor inv_d = inv_d_in.contiguous(), inv_h = inv_h_in.to(inv_d.scalar_type()).contiguous();
  const int64_t R = inv_d.size(1);
  constexpr int64_t kTarget = 1 << 15;  // elements per chunk
  std::vector<Chunk> chunks;
  for (int side = 0; side < 2; ++side) {
    const bool left = side == 0;
    for (int64_t i = 0; i < M; ++i) {
      const at::Tensor& g = left ? grads_a[i] : grads_b[i];
      TORCH_CHECK(g.dim() == 2 && g.stride(1) == 1, "precondition_: gradients must be 2-D with unit column stride");
      const int64_t r = left ? g.size(0) : g.size(1), len = left ? g.size(1) : g.size(0);
      TORCH_CHECK(r >= 1 && r <= R, "precondition_: gradient rank ", r, " exceeds the inverses' R = ", R);
      const auto st = g.scalar_type();
      TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                  "precondition_: gradients must be float32/64, bfloat16 or float16");
      const int64_t step = left ? std::max<int64_t>(32, kTarget / r / 32 * 32) : std::max<int64_t>(8, kTarget / r / 8 * 8);
      for (int64_t b = 0; b < len; b += step) chunks.push_back({i, left, b, std::min(len, b + step)});
    }
  }
  const int64_t n = static_cast<int64_t>(chunks.size());
  std::vector<double> dots(n, 0.0);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::vector<float> pf, tf;
    std::vector<double> pd, td;
    for (int64_t ci = b; ci < e; ++ci) {
      const Chunk& c = chunks[ci];
      const at::Tensor& g = c.left ? grads_a[c.grad] : grads_b[c.grad];
      const at::Tensor& inv = c.left ? inv_d : inv_h;
      double* d = dots.data() + ci;
      switch (g.scalar_type()) {
        case at::kFloat: run_chunk<float, float>(g, inv, c.grad, c, pf, tf, compute_dot, d); break;
        case at::kDouble: run_chunk<double, double>(g, inv, c.grad, c, pd, td, compute_dot, d); break;
        case at::kBFloat16: run_chunk<c10::BFloat16, float>(g, inv, c.grad, c, pf, tf, compute_dot, d); break;
        default: run_chunk<c10::Half, float>(g, inv, c.grad, c, pf, tf, compute_dot, d); break;
      }
    }
  });
  double total = 0;
  for (double d : dots) total += d;
  at::Tensor dot = at::empty({}, inv_d.options().dtype(at::kFloat));
  *dot.data_ptr<float>() = compute_dot ? static_cast<float>(total) : 0.0f;
  return dot;
}

}  // namespace
}  // namespace grit

TORCH_LIBRARY(grit_kernels_cpp, m) {
  m.def("accumulate_gram_(Tensor(a!) out, Tensor x, float weight) -> ()");
  m.def(
      "ema_fold_(Tensor(a!) factor, Tensor stat_sum, Tensor weight, float decay, Tensor(b!) initialized) -> ()");
  m.def(
      "damped_cholesky_inverse(Tensor mats, float damping, float eps_abs, Tensor ranks, Tensor? previous, "
      "Tensor? previous_valid, float retry_factor) -> (Tensor, Tensor)");
  m.def("precondition_(Tensor(a!)[] grads_a, Tensor(b!)[] grads_b, Tensor inv_d, Tensor inv_h, bool compute_dot) -> Tensor");
}

TORCH_LIBRARY_IMPL(grit_kernels_cpp, CPU, m) {
  m.impl("accumulate_gram_", &grit::accumulate_gram_cpu);
  m.impl("ema_fold_", &grit::ema_fold_cpu);
  m.impl("damped_cholesky_inverse", &grit::damped_cholesky_inverse_cpu);
  m.impl("precondition_", &grit::precondition_cpu);
}
