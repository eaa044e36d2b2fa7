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
//   rank_statistics_(stat_sum[2,M,R,R], rows[M], indices[K], h[...,K*r], delta[...,K*r], tolerance)
//                                                            GRIT's per-module Grams, row mask and counts
//   rank_statistics_many_(stat_sum, rows, indices, modules[G], hs[G], deltas[G], tolerance)
//                                                            the same for G recorded groups in one call
//   precondition_grafted_(grads_a, grads_b, inv_d, inv_h)      precondition_, then g *= |g_raw| / |g_new|
//   sum_squares(xs[]) -> 0-dim float64;  clone_all(xs[]) -> copies;  copy_all_(dst[], src[]) -> copied?
//   kl_clip_update_(params_a, params_b, before_a, before_b, factor_d, factor_h, kl_clip) -> nu (0-dim f32)
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
#include <cstring>
#include <limits>
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

// Pairwise (tree) sum of 16 lanes in float: short dependency chains, for many small dot products.
inline float hsum_tree(v16f v) {
  float s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = v[j] + v[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

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

// ---------------------------------------------------------------------- rank-space statistics
// Rows t0..t1 of x[:, 0:r] (row stride ld) converted into tile[t - t0, 0:r] (row stride rw); row_sq[t] =
// |x_t|^2; returns the largest (NaN if any is NaN).
template <typename X, typename T>
GRIT_CLONES T delta_rows(const X* __restrict x, int64_t ld, int r, int rw, int64_t t0, int64_t t1, T* __restrict tile,
                         T* __restrict row_sq) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  T m = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const X* xt = x + t * ld;
    T* dt = tile + (t - t0) * rw;
    T s;
    if constexpr (std::is_same_v<X, float> && std::is_same_v<T, float>) {
      if (r % 16 == 0) {
        v16f acc = {};
        for (int j = 0; j < r; j += 16) {
          const v16f v = GRIT_LOAD(xt + j);
          GRIT_STORE(dt + j, v);
          acc += v * v;
        }
        s = hsum_tree(acc);
        row_sq[t] = s;
        m = (std::isnan(s) || std::isnan(m)) ? nan : std::max(m, s);
        continue;
      }
    }
    T s4[4] = {};
    int j = 0;
    for (; j + 4 <= r; j += 4)
      for (int u = 0; u < 4; ++u) {
        const T v = to_t(xt[j + u]);
        dt[j + u] = v;
        s4[u] += v * v;
      }
    for (; j < r; ++j) {
      const T v = to_t(xt[j]);
      dt[j] = v;
      s4[0] += v * v;
    }
    s = (s4[0] + s4[1]) + (s4[2] + s4[3]);
    row_sq[t] = s;
    m = (std::isnan(s) || std::isnan(m)) ? nan : std::max(m, s);
  }
  return m;
}

// Rows t of x[:, 0:r] with row_sq[t] > threshold, converted and packed into tile (row stride rw); returns
// how many.
template <typename X, typename T>
GRIT_CLONES int64_t gather_rows(const X* __restrict x, int64_t ld, int r, int rw, int64_t t0, int64_t t1,
                                const T* __restrict row_sq, T threshold, T* __restrict tile) {
  int64_t carried = 0;
  for (int64_t t = t0; t < t1; ++t) {
    if (!(row_sq[t] > threshold)) continue;
    const X* xt = x + t * ld;
    T* ht = tile + carried * rw;
    if constexpr (std::is_same_v<X, float> && std::is_same_v<T, float>) {
      if (r % 16 == 0) {
        for (int j = 0; j < r; j += 16) GRIT_STORE(ht + j, GRIT_LOAD(xt + j));
        ++carried;
        continue;
      }
    }
    for (int j = 0; j < r; ++j) ht[j] = to_t(xt[j]);
    ++carried;
  }
  return carried;
}

// r = 16, float: the two passes below straight from the source rows (row stride ld, no tile copies), with the
// operations of delta_rows + gram_tile and of gather_rows + gram_tile in the same order (the same numbers).
// Pass 1: row_sq[t] = |x_t|^2 for t0 <= t < t1, out[16, 16] += sum_t x_t x_t^T; returns the largest row_sq.
GRIT_CLONES float delta_gram16(const float* __restrict x, int64_t ld, int64_t t0, int64_t t1, float* __restrict row_sq,
                               float* __restrict out) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float m = 0;
  v16f a[16] = {};
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * ld;
    const v16f v = GRIT_LOAD(xt);
    v16f acc = {};
    acc += v * v;
    const float s = hsum_tree(acc);
    row_sq[t] = s;
    m = (std::isnan(s) || std::isnan(m)) ? nan : std::max(m, s);
#pragma GCC unroll 16
    for (int b = 0; b < 16; ++b) a[b] += xt[b] * v;
  }
  for (int b = 0; b < 16; ++b) GRIT_STORE(out + b * 16, GRIT_LOAD(out + b * 16) + a[b]);
  return m;
}

// Pass 2: out[16, 16] += sum x_t x_t^T over t0 <= t < t1 with row_sq[t] > threshold; returns how many rows.
GRIT_CLONES int64_t masked_gram16(const float* __restrict x, int64_t ld, int64_t t0, int64_t t1,
                                  const float* __restrict row_sq, float threshold, float* __restrict out) {
  v16f a[16] = {};
  int64_t carried = 0;
  for (int64_t t = t0; t < t1; ++t) {
    if (!(row_sq[t] > threshold)) continue;
    const float* xt = x + t * ld;
    const v16f v = GRIT_LOAD(xt);
#pragma GCC unroll 16
    for (int b = 0; b < 16; ++b) a[b] += xt[b] * v;
    ++carried;
  }
  for (int b = 0; b < 16; ++b) GRIT_STORE(out + b * 16, GRIT_LOAD(out + b * 16) + a[b]);
  return carried;
}

// One module's rank-space rows: h_t = h[t * hs + 0 .. r-1], delta_t = d[t * ds + 0 .. r-1], t < n (unit
// column stride), added to bank index ``index``.
template <typename X>
struct ModuleRows {
  const X* h;
  const X* d;
  int64_t hs, ds, n;
  int r;
  int64_t index;
};

// For every module (in order): rows t with |delta_t|^2 > tol^2 * max_t |delta_t|^2 "carry gradient" (NaN
// anywhere: none does), and
//   stat_sum[0, index] += sum_{t carrying} h_t h_t^T,  stat_sum[1, index] += sum_t delta_t delta_t^T,
//   rows[index] += number of carrying rows.
// Two passes over 256-row chunks, parallel over (module, chunk) tasks of all modules; each module's partial
// Grams are summed in chunk order and added to the bank in module order, so the result depends neither on
// the thread count nor on how modules are grouped into calls (a module's numbers are those of a call of its own).
template <typename X, typename T>
void rank_statistics_impl(at::Tensor& stat_sum, at::Tensor& rows, const std::vector<ModuleRows<X>>& mods, double tol) {
  constexpr int64_t kChunk = 256;
  const int64_t M = static_cast<int64_t>(mods.size());
  std::vector<int64_t> first_task(M + 1, 0), first_row(M + 1, 0);
  int rmax = 1;
  for (int64_t k = 0; k < M; ++k) {
    first_task[k + 1] = first_task[k] + (mods[k].n + kChunk - 1) / kChunk;
    first_row[k + 1] = first_row[k] + mods[k].n;
    rmax = std::max(rmax, mods[k].r);
  }
  const int64_t tasks = first_task[M];
  if (tasks == 0) return;
  const int rwmax = (rmax + 15) / 16 * 16;
  const int64_t slot = int64_t{2} * rmax * rwmax;  // partial Grams of one task: [2][rmax][rwmax]
  std::vector<int64_t> task_module(tasks);
  for (int64_t k = 0; k < M; ++k)
    for (int64_t t = first_task[k]; t < first_task[k + 1]; ++t) task_module[t] = k;
  std::vector<T> row_sq(static_cast<size_t>(std::max<int64_t>(first_row[M], 1))), task_max(tasks, T(0));
  std::vector<T> partial(static_cast<size_t>(tasks) * slot, T(0));
  std::vector<int64_t> counts(tasks, 0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  // small inputs (one PEFT module of a CPU micro-batch) run inline: a parallel region costs more
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kChunk * rmax));
  // pass 1: delta tiles -> squared row norms, their maximum per task, and sum delta delta^T
  at::parallel_for(0, tasks, grain, [&](int64_t b, int64_t e) {
    std::vector<T> td(static_cast<size_t>(kChunk) * rwmax, T(0));
    for (int64_t task = b; task < e; ++task) {
      const ModuleRows<X>& mod = mods[task_module[task]];
      const int rw = (mod.r + 15) / 16 * 16;
      const int64_t t0 = (task - first_task[task_module[task]]) * kChunk, t1 = std::min(mod.n, t0 + kChunk);
      if constexpr (std::is_same_v<X, float> && std::is_same_v<T, float>) {
        if (mod.r == 16) {
          task_max[task] = delta_gram16(mod.d, mod.ds, t0, t1, row_sq.data() + first_row[task_module[task]],
                                        partial.data() + task * slot + 16 * 16);
          continue;
        }
      }
      task_max[task] = delta_rows<X, T>(mod.d, mod.ds, mod.r, rw, t0, t1, td.data(),
                                        row_sq.data() + first_row[task_module[task]]);
      gram_tile<T>(td.data(), t1 - t0, mod.r, rw, partial.data() + task * slot + mod.r * rw);
    }
  });
  std::vector<T> threshold(M);
  for (int64_t k = 0; k < M; ++k) {
    T m = 0;
    for (int64_t c = first_task[k]; c < first_task[k + 1]; ++c) {
      const T v = task_max[c];
      m = (std::isnan(v) || std::isnan(m)) ? nan : std::max(m, v);
    }
    threshold[k] = m * static_cast<T>(tol * tol);
  }
  // pass 2: sum h h^T over the rows that carry gradient
  at::parallel_for(0, tasks, grain, [&](int64_t b, int64_t e) {
    std::vector<T> th(static_cast<size_t>(kChunk) * rwmax, T(0));
    for (int64_t task = b; task < e; ++task) {
      const int64_t k = task_module[task];
      const ModuleRows<X>& mod = mods[k];
      const int rw = (mod.r + 15) / 16 * 16;
      const int64_t t0 = (task - first_task[k]) * kChunk, t1 = std::min(mod.n, t0 + kChunk);
      if constexpr (std::is_same_v<X, float> && std::is_same_v<T, float>) {
        if (mod.r == 16) {
          counts[task] = masked_gram16(mod.h, mod.hs, t0, t1, row_sq.data() + first_row[k], threshold[k],
                                       partial.data() + task * slot);
          continue;
        }
      }
      const int64_t carried =
          gather_rows<X, T>(mod.h, mod.hs, mod.r, rw, t0, t1, row_sq.data() + first_row[k], threshold[k], th.data());
      gram_tile<T>(th.data(), carried, mod.r, rw, partial.data() + task * slot);
      counts[task] = carried;
    }
  });
  auto s = stat_sum.accessor<T, 4>();
  auto n = rows.accessor<T, 1>();
  for (int64_t k = 0; k < M; ++k) {  // in module order: a module listed twice gets both additions in turn
    const int64_t m = mods[k].index;
    const int r = mods[k].r, rw = (r + 15) / 16 * 16;
    int64_t carried = 0;
    for (int64_t c = first_task[k]; c < first_task[k + 1]; ++c) carried += counts[c];
    n[m] += static_cast<T>(carried);
    for (int which = 0; which < 2; ++which)
      for (int i = 0; i < r; ++i)
        for (int j = 0; j < r; ++j) {
          T v = 0;
          for (int64_t c = first_task[k]; c < first_task[k + 1]; ++c) v += partial[c * slot + which * r * rw + i * rw + j];
          s[which][m][i][j] += v;
        }
  }
}

void check_bank(const at::Tensor& stat_sum, const at::Tensor& rows, const char* op) {
  TORCH_CHECK(stat_sum.dim() == 4 && stat_sum.size(0) == 2 && stat_sum.size(2) == stat_sum.size(3), op,
              ": stat_sum must be [2, M, R, R]");
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == stat_sum.size(1) && rows.scalar_type() == stat_sum.scalar_type(), op,
              ": rows must be [M] of stat_sum's dtype");
  TORCH_CHECK(stat_sum.scalar_type() == at::kFloat || stat_sum.scalar_type() == at::kDouble, op,
              ": stat_sum must be float32 or float64");
}

// x [..., c] as rows: ``n`` rows of ``c`` elements, row t at data + t * ld, when the column stride is 1 and
// the leading dims collapse into one with a uniform stride (what ``reshape(-1, c)`` would return as a view);
// false otherwise. No tensor is made: one backward records hundreds of groups.
bool as_rows(const at::Tensor& x, int64_t& n, int64_t& ld) {
  const int64_t D = x.dim();
  if (x.size(D - 1) > 1 && x.stride(D - 1) != 1) return false;
  n = 1;
  ld = x.size(D - 1);
  int64_t span = -1;  // elements spanned by the dims inside the current one
  for (int64_t i = D - 2; i >= 0; --i) {
    if (x.size(i) == 1) continue;
    if (span < 0) {
      ld = x.stride(i);
    } else if (x.stride(i) != span) {
      return false;
    }
    span = x.stride(i) * x.size(i);
    n *= x.size(i);
  }
  return true;
}

// Appends the K modules of one recorded group (h, delta [..., K * r], modules side by side, bank indices
// idx[0..K)) to ``mods``. Rows are read in place where they can be (as_rows); otherwise from 2-D
// contiguous copies kept alive in ``keep``.
template <typename X>
void add_group(std::vector<ModuleRows<X>>& mods, std::vector<at::Tensor>& keep, const at::Tensor& h,
               const at::Tensor& delta, const int64_t* idx, int64_t K) {
  auto rows_of = [&keep](const at::Tensor& x, int64_t& n, int64_t& ld) -> const X* {
    if (as_rows(x, n, ld)) return x.data_ptr<X>();
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    if (x2.stride(1) != 1) x2 = x2.contiguous();
    n = x2.size(0);
    ld = x2.stride(0);
    keep.push_back(x2);
    return x2.data_ptr<X>();
  };
  int64_t n = 0, hs = 0, ds = 0;
  const X* hp = rows_of(h, n, hs);
  const X* dp = rows_of(delta, n, ds);
  const int r = static_cast<int>(h.size(-1) / K);
  for (int64_t k = 0; k < K; ++k) mods.push_back({hp + k * r, dp + k * r, hs, ds, n, r, idx[k]});
}

void check_group(const at::Tensor& stat_sum, const at::Tensor& h, const at::Tensor& delta, const int64_t* idx,
                 int64_t K, const char* op) {
  TORCH_CHECK(K >= 1 && h.dim() >= 1 && h.sizes() == delta.sizes() && h.size(-1) % K == 0 &&
                  h.scalar_type() == delta.scalar_type() && h.device().is_cpu() && delta.device().is_cpu(),
              op, ": h and delta must be CPU [..., K * r] of one dtype, K = number of indices >= 1");
  TORCH_CHECK(h.size(-1) / K <= stat_sum.size(2), op, ": rank ", h.size(-1) / K, " exceeds the bank's R = ",
              stat_sum.size(2));
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(idx[k] >= 0 && idx[k] < stat_sum.size(1), op, ": index ", idx[k], " out of range");
}

// groups[g] = (h_g, delta_g, K_g modules with bank indices idx[offset_g ..]); one dtype for all h / delta.
void rank_statistics_groups(at::Tensor& stat_sum, at::Tensor& rows, at::IntArrayRef indices, at::IntArrayRef modules,
                            at::TensorList hs, at::TensorList deltas, double tolerance, const char* op) {
  check_bank(stat_sum, rows, op);
  const int64_t G = static_cast<int64_t>(hs.size());
  TORCH_CHECK(static_cast<int64_t>(deltas.size()) == G && static_cast<int64_t>(modules.size()) == G, op,
              ": one h, one delta and one module count per group");
  int64_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(modules[g] >= 1 && total + modules[g] <= static_cast<int64_t>(indices.size()), op,
                ": module counts do not match the indices");
    check_group(stat_sum, hs[g], deltas[g], indices.data() + total, modules[g], op);
    TORCH_CHECK(hs[g].scalar_type() == hs[0].scalar_type(), op, ": every h / delta must have one dtype");
    total += modules[g];
  }
  TORCH_CHECK(total == static_cast<int64_t>(indices.size()), op, ": module counts do not match the indices");
  if (G == 0) return;
  AT_DISPATCH_FLOATING_TYPES(stat_sum.scalar_type(), "rank_statistics_", [&] {
    using T = scalar_t;
    auto run = [&](auto tag) {
      using X = decltype(tag);
      std::vector<ModuleRows<X>> mods;
      std::vector<at::Tensor> keep;
      mods.reserve(total);
      int64_t at = 0;
      for (int64_t g = 0; g < G; ++g) {
        if (hs[g].numel() > 0) add_group<X>(mods, keep, hs[g], deltas[g], indices.data() + at, modules[g]);
        at += modules[g];
      }
      rank_statistics_impl<X, T>(stat_sum, rows, mods, tolerance);
    };
    switch (hs[0].scalar_type()) {
      case at::kFloat: run(float{}); break;
      case at::kDouble: run(double{}); break;
      case at::kBFloat16: run(c10::BFloat16{}); break;
      case at::kHalf: run(c10::Half{}); break;
      default: TORCH_CHECK(false, op, ": h must be float32/64, bfloat16 or float16");
    }
  });
}

void rank_statistics_cpu(at::Tensor stat_sum, at::Tensor rows, at::IntArrayRef indices, const at::Tensor& h,
                         const at::Tensor& delta, double tolerance) {
  const std::vector<int64_t> count{static_cast<int64_t>(indices.size())};
  TORCH_CHECK(!indices.empty(), "rank_statistics_: h and delta must be [..., K * r] of one dtype, K = len(indices) >= 1");
  rank_statistics_groups(stat_sum, rows, indices, count, {h}, {delta}, tolerance, "rank_statistics_");
}

// rank_statistics_ of many recorded groups in one call (one backward's capture): group g is hs[g], deltas[g]
// [..., modules[g] * r_g] with bank indices indices[sum_{j<g} modules[j] ..]; the same numbers as one
// rank_statistics_ call per group, in group order.
void rank_statistics_many_cpu(at::Tensor stat_sum, at::Tensor rows, at::IntArrayRef indices, at::IntArrayRef modules,
                              at::TensorList hs, at::TensorList deltas, double tolerance) {
  rank_statistics_groups(stat_sum, rows, indices, modules, hs, deltas, tolerance, "rank_statistics_many_");
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

// cholesky_inverse<float> of 16 matrices of rank r at once, one per vector lane (a[p * r + q]: the 16
// matrices' entries, *lam: their damping): the same operations in the same order per lane, compiled without
// fused multiply-add like the scalar code (baseline ISA), so a lane that succeeds holds exactly the scalar
// result. Returns the lanes that succeeded (bit u: lane u); the others are for the scalar fallback chain.
uint32_t cholesky_inverse16(const v16f* a, int r, const v16f* lam, v16f* l, v16f* m, v16f* inv) {
  uint32_t ok = 0xFFFFu;
  for (int j = 0; j < r; ++j) {
    v16f d = a[j * r + j] + *lam;
    for (int k = 0; k < j; ++k) d -= l[j * r + k] * l[j * r + k];
    v16f ljj;
    for (int u = 0; u < 16; ++u) {
      if (!(d[u] > 0.0f) || !std::isfinite(d[u])) ok &= ~(1u << u);
      ljj[u] = std::sqrt(d[u]);
    }
    if (!ok) return 0;
    l[j * r + j] = ljj;
    const v16f inv_ljj = 1.0f / ljj;
    for (int i = j + 1; i < r; ++i) {
      v16f s = a[i * r + j];
      for (int k = 0; k < j; ++k) s -= l[i * r + k] * l[j * r + k];
      l[i * r + j] = s * inv_ljj;
    }
  }
  for (int j = 0; j < r; ++j) {
    m[j * r + j] = 1.0f / l[j * r + j];
    for (int i = j + 1; i < r; ++i) {
      v16f s = {};
      for (int k = j; k < i; ++k) s -= l[i * r + k] * m[k * r + j];
      m[i * r + j] = s / l[i * r + i];
    }
  }
  for (int k = 0; k < r * r; ++k) inv[k] = v16f{};
  for (int k = 0; k < r; ++k) {
    const v16f* mk = m + k * r;
    for (int i = 0; i <= k; ++i) {
      const v16f mi = mk[i];
      for (int j = 0; j <= k; ++j) inv[i * r + j] += mi * mk[j];
    }
  }
  for (int k = 0; k < r * r; ++k)
    for (int u = 0; u < 16; ++u)
      if (!std::isfinite(inv[k][u])) ok &= ~(1u << u);
  return ok;
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
    auto rank_of = [&](int64_t i) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(rp[i], 1), R)); };
    // the scalar chain of one matrix: first attempt, retry, previous inverse, I / lam
    auto invert_one = [&](int64_t i, int r, T* a, T* l, T* inv) {
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
        if (cholesky_inverse<T>(a, r, lam, l, inv)) {
          code = kOk, done = true;
        } else if (cholesky_inverse<T>(a, r, lam * static_cast<T>(retry_factor), l, inv)) {
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
        std::fill(inv, inv + r * r, T(0));
        for (int p = 0; p < r; ++p) inv[p * r + p] = diag;
      }
      T* dst = op + i * R * R;
      for (int p = 0; p < R; ++p)
        for (int q = 0; q < R; ++q)
          dst[p * R + q] = (p < r && q < r) ? T(0.5) * (inv[p * r + q] + inv[q * r + p]) : T(p == q);
      sp[i] = code;
    };
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
      std::vector<T> a(R * R), l(R * R), inv(R * R);
      int64_t i = b;
      if constexpr (std::is_same_v<T, float>) {  // blocks of 16 matrices of one rank: first attempt in vector lanes
        std::vector<v16f> av(R * R), lv(R * R), mv(R * R), iv(R * R);
        for (; i + 16 <= e; i += 16) {
          const int r = rank_of(i);
          bool same = true;
          for (int u = 1; u < 16; ++u) same = same && rank_of(i + u) == r;
          if (!same) break;
          v16f lam;
          uint32_t finite = 0;
          for (int u = 0; u < 16; ++u) {  // exactly the scalar code's input check, trace and damping
            const T* src = mp + (i + u) * R * R;
            bool fin = true;
            T trace = 0;
            for (int p = 0; p < r; ++p)
              for (int q = 0; q < r; ++q) {
                const T v = src[p * R + q];
                av[p * r + q][u] = v;
                fin = fin && std::isfinite(v);
              }
            for (int p = 0; p < r; ++p) trace += src[p * R + p];
            lam[u] = static_cast<T>(damping) * trace / static_cast<T>(r) + static_cast<T>(eps_abs);
            if (fin && std::isfinite(lam[u])) finite |= 1u << u;
          }
          const uint32_t ok = finite & cholesky_inverse16(av.data(), r, &lam, lv.data(), mv.data(), iv.data());
          for (int u = 0; u < 16; ++u) {
            if (!(ok >> u & 1u)) {
              invert_one(i + u, r, a.data(), l.data(), inv.data());
              continue;
            }
            T* dst = op + (i + u) * R * R;
            for (int p = 0; p < R; ++p)
              for (int q = 0; q < R; ++q)
                dst[p * R + q] = (p < r && q < r) ? T(0.5) * (iv[p * r + q][u] + iv[q * r + p][u]) : T(p == q);
            sp[i + u] = kOk;
          }
        }
      }
      for (; i < e; ++i) invert_one(i, rank_of(i), a.data(), l.data(), inv.data());
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

// Validated inverses (inv_h in inv_d's dtype, both contiguous) and the work chunks of precondition_: all
// lora_A gradients' column chunks, then all lora_B gradients' row chunks, each tensor's chunks contiguous.
std::vector<Chunk> precondition_chunks(at::TensorList grads_a, at::TensorList grads_b, const at::Tensor& inv_d_in,
                                       const at::Tensor& inv_h_in, at::Tensor& inv_d, at::Tensor& inv_h) {
  const int64_t M = static_cast<int64_t>(grads_a.size());
  TORCH_CHECK(static_cast<int64_t>(grads_b.size()) == M && inv_d_in.dim() == 3 && inv_d_in.size(0) >= M &&
                  inv_h_in.sizes() == inv_d_in.sizes(),
              "precondition_: one lora_A and one lora_B grad per module and [M, R, R] inverses");
  TORCH_CHECK(inv_d_in.scalar_type() == at::kFloat || inv_d_in.scalar_type() == at::kDouble,
              "precondition_: inverses must be float32 or float64");
  inv_d = inv_d_in.contiguous();
  inv_h = inv_h_in.to(inv_d.scalar_type()).contiguous();
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
  return chunks;
}

// Per-thread scratch of run_chunk_any.
struct ChunkScratch {
  std::vector<float> pf, tf;
  std::vector<double> pd, td;
};

void run_chunk_any(const at::Tensor& g, const at::Tensor& inv, const Chunk& c, ChunkScratch& w, bool compute_dot,
                   double* d) {
  switch (g.scalar_type()) {
    case at::kFloat: run_chunk<float, float>(g, inv, c.grad, c, w.pf, w.tf, compute_dot, d); break;
    case at::kDouble: run_chunk<double, double>(g, inv, c.grad, c, w.pd, w.td, compute_dot, d); break;
    case at::kBFloat16: run_chunk<c10::BFloat16, float>(g, inv, c.grad, c, w.pf, w.tf, compute_dot, d); break;
    default: run_chunk<c10::Half, float>(g, inv, c.grad, c, w.pf, w.tf, compute_dot, d); break;
  }
}

at::Tensor precondition_cpu(at::TensorList grads_a, at::TensorList grads_b, const at::Tensor& inv_d_in,
                            const at::Tensor& inv_h_in, bool compute_dot) {
  at::Tensor inv_d, inv_h;
  const std::vector<Chunk> chunks = precondition_chunks(grads_a, grads_b, inv_d_in, inv_h_in, inv_d, inv_h);
  const int64_t n = static_cast<int64_t>(chunks.size());
  std::vector<double> dots(n, 0.0);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    ChunkScratch w;
    for (int64_t ci = b; ci < e; ++ci) {
      const Chunk& c = chunks[ci];
      run_chunk_any(c.left ? grads_a[c.grad] : grads_b[c.grad], c.left ? inv_d : inv_h, c, w, compute_dot,
                    dots.data() + ci);
    }
  });
  double total = 0;
  for (double d : dots) total += d;
  at::Tensor dot = at::empty({}, inv_d.options().dtype(at::kFloat));
  *dot.data_ptr<float>() = compute_dot ? static_cast<float>(total) : 0.0f;
  return dot;
}

// ------------------------------------------------------------------ grafting, KL-clip, snapshots
// Sum of squares of a 2-D tensor with unit column stride, in double (8 independent partial sums).
template <typename G>
GRIT_CLONES double sum_squares_2d(const at::Tensor& g) {
  const G* p = g.data_ptr<G>();
  const int64_t rows = g.size(0), cols = g.size(1), ld = g.stride(0);
  if constexpr (std::is_same_v<G, float>) {  // 16 float lanes over the whole tensor, tails in double
    v16f acc = {};
    double tail = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = p + i * ld;
      int64_t j = 0;
      for (; j + 16 <= cols; j += 16) {
        const v16f v = GRIT_LOAD(row + j);
        acc += v * v;
      }
      for (; j < cols; ++j) tail += static_cast<double>(row[j]) * row[j];
    }
    return hsum(acc) + tail;
  }
  double acc[8] = {};
  for (int64_t i = 0; i < rows; ++i) {
    const G* row = p + i * ld;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8)
      for (int u = 0; u < 8; ++u) {
        const double v = to_t(row[j + u]);
        acc[u] += v * v;
      }
    for (; j < cols; ++j) {
      const double v = to_t(row[j]);
      acc[0] += v * v;
    }
  }
  double s = 0;
  for (int u = 0; u < 8; ++u) s += acc[u];
  return s;
}

double sum_squares_any(const at::Tensor& g) {
  switch (g.scalar_type()) {
    case at::kFloat: return sum_squares_2d<float>(g);
    case at::kDouble: return sum_squares_2d<double>(g);
    case at::kBFloat16: return sum_squares_2d<c10::BFloat16>(g);
    default: return sum_squares_2d<c10::Half>(g);
  }
}

template <typename G>
void scale_2d(const at::Tensor& g, float factor) {
  G* p = g.data_ptr<G>();
  const int64_t rows = g.size(0), cols = g.size(1), ld = g.stride(0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) p[i * ld + j] = static_cast<G>(static_cast<float>(to_t(p[i * ld + j])) * factor);
}

void scale_any(const at::Tensor& g, float factor) {
  switch (g.scalar_type()) {
    case at::kFloat: return scale_2d<float>(g, factor);
    case at::kDouble: return scale_2d<double>(g, factor);
    case at::kBFloat16: return scale_2d<c10::BFloat16>(g, factor);
    default: return scale_2d<c10::Half>(g, factor);
  }
}

void check_2d_list(at::TensorList xs, const char* op) {
  for (const at::Tensor& g : xs) {
    const auto st = g.scalar_type();
    TORCH_CHECK(g.dim() == 2 && g.stride(1) == 1 && g.device().is_cpu() &&
                    (st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf),
                op, ": tensors must be 2-D CPU float32/64, bfloat16 or float16 with unit column stride");
  }
}

// precondition_ followed by grafting: every gradient g_i <- P g_i * |g_i| / max(|P g_i|, FLT_MIN)
// (GritConfig.graft: GRIT's direction, the raw gradient's norm, per tensor).
void precondition_grafted_cpu(at::TensorList grads_a, at::TensorList grads_b, const at::Tensor& inv_d_in,
                              const at::Tensor& inv_h_in) {
  check_2d_list(grads_a, "precondition_grafted_");
  check_2d_list(grads_b, "precondition_grafted_");
  at::Tensor inv_d, inv_h;
  const std::vector<Chunk> chunks = precondition_chunks(grads_a, grads_b, inv_d_in, inv_h_in, inv_d, inv_h);
  const int64_t M = static_cast<int64_t>(grads_a.size()), n = 2 * M;
  std::vector<int64_t> first(n + 1, static_cast<int64_t>(chunks.size()));  // tensor t's chunks: [first[t], first[t+1])
  for (int64_t ci = static_cast<int64_t>(chunks.size()) - 1; ci >= 0; --ci)
    first[(chunks[ci].left ? 0 : M) + chunks[ci].grad] = ci;
  for (int64_t t = n - 1; t >= 0; --t) first[t] = std::min(first[t], first[t + 1]);
  // one tensor at a time (it stays in cache): raw norm, precondition, new norm, rescale
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    ChunkScratch w;
    double unused = 0;
    for (int64_t t = b; t < e; ++t) {
      const at::Tensor& g = t < M ? grads_a[t] : grads_b[t - M];
      const double raw = sum_squares_any(g);
      for (int64_t ci = first[t]; ci < first[t + 1]; ++ci) run_chunk_any(g, t < M ? inv_d : inv_h, chunks[ci], w, false, &unused);
      const float now = static_cast<float>(std::sqrt(sum_squares_any(g)));
      const float ratio = static_cast<float>(std::sqrt(raw)) / std::max(now, std::numeric_limits<float>::min());
      scale_any(g, ratio);
    }
  });
}

// Total sum of squares of every tensor (double accumulation; NaN/Inf propagate). [] -> 0.
at::Tensor sum_squares_cpu(at::TensorList xs) {
  check_2d_list(xs, "sum_squares");
  const int64_t n = static_cast<int64_t>(xs.size());
  std::vector<double> part(n);
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) part[i] = sum_squares_any(xs[i]);
  });
  double total = 0;
  for (double v : part) total += v;
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  *out.data_ptr<double>() = total;
  return out;
}

// Contiguous copies of every tensor (one op instead of one copy kernel per tensor).
std::vector<at::Tensor> clone_all_cpu(at::TensorList xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const at::Tensor& x : xs) out.push_back(at::empty_like(x, at::MemoryFormat::Contiguous));
  const int64_t n = static_cast<int64_t>(xs.size());
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (xs[i].is_contiguous() && xs[i].device().is_cpu())
        std::memcpy(out[i].data_ptr(), xs[i].data_ptr(), xs[i].numel() * xs[i].element_size());
      else
        out[i].copy_(xs[i]);
    }
  });
  return out;
}

// dst[i] <- src[i] for every i when every pair has one shape and dtype and both are contiguous CPU tensors
// (returns true); otherwise copies nothing and returns false. For snapshots into buffers kept across steps.
bool copy_all_cpu(at::TensorList dst, at::TensorList src) {
  if (dst.size() != src.size()) return false;
  for (size_t i = 0; i < src.size(); ++i)
    if (!(dst[i].sizes() == src[i].sizes() && dst[i].scalar_type() == src[i].scalar_type() && dst[i].is_contiguous() &&
          src[i].is_contiguous() && dst[i].device().is_cpu() && src[i].device().is_cpu()))
      return false;
  const int64_t n = static_cast<int64_t>(src.size());
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      std::memcpy(dst[i].data_ptr(), src[i].data_ptr(), src[i].numel() * src[i].element_size());
  });
  return true;
}

// Quadratic form of Delta = p - b (both [rows, cols], unit column stride) with the symmetric f[r, r]
// (row stride R): lora_A (``rows_side``, Delta [r, d]): sum_ij f_ij <Delta_i, Delta_j> over rows of Delta;
// lora_B (Delta [d, r]): sum_ij f_ij (Delta^T Delta)_ij via 16-wide tiles of rows.
template <typename G>
GRIT_CLONES double delta_quad(const at::Tensor& p, const at::Tensor& b, bool rows_side, int r, const double* f,
                              int64_t R, std::vector<float>& tile, std::vector<float>& acc, std::vector<double>& g) {
  const G* pp = p.data_ptr<G>();
  const G* bp = b.data_ptr<G>();
  const int64_t lp = p.stride(0), lb = b.stride(0);
  double q = 0;
  if (rows_side) {
    constexpr int64_t kCols = 1024;
    const int64_t len = p.size(1);
    tile.resize(static_cast<size_t>(r) * kCols);
    g.assign(static_cast<size_t>(r) * r, 0.0);
    for (int64_t c0 = 0; c0 < len; c0 += kCols) {
      const int64_t w = std::min(kCols, len - c0);
      for (int i = 0; i < r; ++i) {
        const G* pi = pp + i * lp + c0;
        const G* bi = bp + i * lb + c0;
        float* ti = tile.data() + i * kCols;
        for (int64_t j = 0; j < w; ++j) ti[j] = static_cast<float>(to_t(pi[j])) - static_cast<float>(to_t(bi[j]));
      }
      for (int i = 0; i < r; ++i)
        for (int k = 0; k <= i; ++k) {
          const float* ti = tile.data() + i * kCols;
          const float* tk = tile.data() + k * kCols;
          v16f acc = {};
          int64_t j = 0;
          for (; j + 16 <= w; j += 16) acc += GRIT_LOAD(ti + j) * GRIT_LOAD(tk + j);
          double d = hsum_tree(acc);
          for (; j < w; ++j) d += static_cast<double>(ti[j]) * tk[j];
          g[i * r + k] += d;
        }
    }
    for (int i = 0; i < r; ++i) {
      q += f[i * R + i] * g[i * r + i];
      for (int k = 0; k < i; ++k) q += (f[i * R + k] + f[k * R + i]) * g[i * r + k];
    }
    return q;
  }
  constexpr int64_t kRows = 256;
  const int rw = (r + 15) / 16 * 16;
  const int64_t len = p.size(0);
  tile.resize(static_cast<size_t>(kRows) * rw);  // row t: r differences, then zeros up to rw (set below)
  acc.assign(static_cast<size_t>(r) * rw, 0.0f);
  for (int64_t t0 = 0; t0 < len; t0 += kRows) {
    const int64_t n = std::min(kRows, len - t0);
    for (int64_t t = 0; t < n; ++t) {
      const G* pt = pp + (t0 + t) * lp;
      const G* bt = bp + (t0 + t) * lb;
      float* tt = tile.data() + t * rw;
      for (int j = 0; j < r; ++j) tt[j] = static_cast<float>(to_t(pt[j])) - static_cast<float>(to_t(bt[j]));
      for (int j = r; j < rw; ++j) tt[j] = 0.0f;
    }
    gram_tile<float>(tile.data(), n, r, rw, acc.data());
  }
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < r; ++j) q += f[i * R + j] * static_cast<double>(acc[i * rw + j]);
  return q;
}

double delta_quad_any(const at::Tensor& p, const at::Tensor& b, bool rows_side, int r, const double* f, int64_t R,
                      std::vector<float>& tile, std::vector<float>& acc, std::vector<double>& g) {
  switch (p.scalar_type()) {
    case at::kFloat: return delta_quad<float>(p, b, rows_side, r, f, R, tile, acc, g);
    case at::kDouble: return delta_quad<double>(p, b, rows_side, r, f, R, tile, acc, g);
    case at::kBFloat16: return delta_quad<c10::BFloat16>(p, b, rows_side, r, f, R, tile, acc, g);
    default: return delta_quad<c10::Half>(p, b, rows_side, r, f, R, tile, acc, g);
  }
}

template <typename G>
GRIT_CLONES void blend_2d(const at::Tensor& p, const at::Tensor& b, float nu) {
  G* pp = p.data_ptr<G>();
  const G* bp = b.data_ptr<G>();
  const int64_t rows = p.size(0), cols = p.size(1), lp = p.stride(0), lb = b.stride(0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const float before = to_t(bp[i * lb + j]), now = to_t(pp[i * lp + j]);
      pp[i * lp + j] = static_cast<G>(before + nu * (now - before));
    }
}

// KL-clip of the step just taken: Delta = params - before; q = sum_m <D_m Delta_A, Delta_A> +
// <Delta_B H_m, Delta_B> (factors' leading r x r blocks); nu = min(1, sqrt(kl_clip / max(|q|, FLT_MIN)));
// where nu < 1, params <- before + nu Delta. Returns nu (0-dim float32).
at::Tensor kl_clip_update_cpu(at::TensorList params_a, at::TensorList params_b, at::TensorList before_a,
                              at::TensorList before_b, const at::Tensor& factor_d_in, const at::Tensor& factor_h_in,
                              double kl_clip) {
  const int64_t M = static_cast<int64_t>(params_a.size());
  TORCH_CHECK(static_cast<int64_t>(params_b.size()) == M && static_cast<int64_t>(before_a.size()) == M &&
                  static_cast<int64_t>(before_b.size()) == M && factor_d_in.dim() == 3 && factor_d_in.size(0) >= M &&
                  factor_h_in.sizes() == factor_d_in.sizes(),
              "kl_clip_update_: M lora_A / lora_B params and snapshots, [M, R, R] factors");
  check_2d_list(params_a, "kl_clip_update_");
  check_2d_list(params_b, "kl_clip_update_");
  check_2d_list(before_a, "kl_clip_update_");
  check_2d_list(before_b, "kl_clip_update_");
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(params_a[i].sizes() == before_a[i].sizes() && params_b[i].sizes() == before_b[i].sizes() &&
                    params_a[i].scalar_type() == before_a[i].scalar_type() &&
                    params_b[i].scalar_type() == before_b[i].scalar_type() && params_a[i].size(0) == params_b[i].size(1) &&
                    params_a[i].size(0) <= factor_d_in.size(1),
                "kl_clip_update_: module ", i, ": snapshots must match the params; ranks <= R");
  // float32 factors (the bank's) are read in place, each module's r x r blocks widened to double on the fly
  // (the values .to(kDouble) gives); other dtypes are converted once
  const bool f32 = factor_d_in.scalar_type() == at::kFloat && factor_h_in.scalar_type() == at::kFloat;
  const at::Tensor fd = f32 ? factor_d_in.contiguous() : factor_d_in.to(at::kDouble).contiguous();
  const at::Tensor fh = f32 ? factor_h_in.contiguous() : factor_h_in.to(at::kDouble).contiguous();
  const int64_t R = fd.size(1);
  auto block = [&](const at::Tensor& f, int64_t m, int r, std::vector<double>& buf) -> const double* {
    if (!f32) return f.data_ptr<double>() + m * R * R;
    const float* src = f.data_ptr<float>() + m * R * R;
    buf.resize(static_cast<size_t>(R) * R);
    for (int i = 0; i < r; ++i)
      for (int k = 0; k < r; ++k) buf[i * R + k] = static_cast<double>(src[i * R + k]);
    return buf.data();
  };
  std::vector<double> quad(M, 0.0);
  at::parallel_for(0, M, 4, [&](int64_t b, int64_t e) {
    std::vector<float> tile, acc;
    std::vector<double> g, fbuf;
    for (int64_t m = b; m < e; ++m) {
      const int r = static_cast<int>(params_a[m].size(0));
      quad[m] = delta_quad_any(params_a[m], before_a[m], true, r, block(fd, m, r, fbuf), R, tile, acc, g);
      quad[m] += delta_quad_any(params_b[m], before_b[m], false, r, block(fh, m, r, fbuf), R, tile, acc, g);
    }
  });
  double total = 0;
  for (double q : quad) total += q;
  const float q32 = std::max(std::fabs(static_cast<float>(total)), std::numeric_limits<float>::min());
  const float nu = std::min(1.0f, std::sqrt(static_cast<float>(kl_clip) / q32));
  if (nu < 1.0f) {
    at::parallel_for(0, 2 * M, 8, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const at::Tensor& p = i < M ? params_a[i] : params_b[i - M];
        const at::Tensor& bf = i < M ? before_a[i] : before_b[i - M];
        switch (p.scalar_type()) {
          case at::kFloat: blend_2d<float>(p, bf, nu); break;
          case at::kDouble: blend_2d<double>(p, bf, nu); break;
          case at::kBFloat16: blend_2d<c10::BFloat16>(p, bf, nu); break;
          default: blend_2d<c10::Half>(p, bf, nu); break;
        }
      }
    });
  }
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.data_ptr<float>() = nu;
  return out;
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
  m.def(
      "rank_statistics_(Tensor(a!) stat_sum, Tensor(b!) rows, int[] indices, Tensor h, Tensor delta, float tolerance) "
      "-> ()");
  m.def(
      "rank_statistics_many_(Tensor(a!) stat_sum, Tensor(b!) rows, int[] indices, int[] modules, Tensor[] hs, "
      "Tensor[] deltas, float tolerance) -> ()");
  m.def("precondition_grafted_(Tensor(a!)[] grads_a, Tensor(b!)[] grads_b, Tensor inv_d, Tensor inv_h) -> ()");
  m.def("sum_squares(Tensor[] xs) -> Tensor");
  m.def("clone_all(Tensor[] xs) -> Tensor[]");
  m.def("copy_all_(Tensor(a!)[] dst, Tensor[] src) -> bool");
  m.def(
      "kl_clip_update_(Tensor(a!)[] params_a, Tensor(b!)[] params_b, Tensor[] before_a, Tensor[] before_b, "
      "Tensor factor_d, Tensor factor_h, float kl_clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(grit_kernels_cpp, CPU, m) {
  m.impl("accumulate_gram_", &grit::accumulate_gram_cpu);
  m.impl("ema_fold_", &grit::ema_fold_cpu);
  m.impl("damped_cholesky_inverse", &grit::damped_cholesky_inverse_cpu);
  m.impl("precondition_", &grit::precondition_cpu);
  m.impl("rank_statistics_", &grit::rank_statistics_cpu);
  m.impl("rank_statistics_many_", &grit::rank_statistics_many_cpu);
  m.impl("precondition_grafted_", &grit::precondition_grafted_cpu);
  m.impl("sum_squares", &grit::sum_squares_cpu);
  m.impl("clone_all", &grit::clone_all_cpu);
  m.impl("copy_all_", &grit::copy_all_cpu);
  m.impl("kl_clip_update_", &grit::kl_clip_update_cpu);
}
