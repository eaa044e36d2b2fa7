// CUDA implementations of the grit_kernels_cpp ops (schemas: grit_cpu.cpp). Registered for the CUDA
// dispatch key; built only into the CUDA extension (setup.py, or the JIT loader on a CUDA machine).
//
// * accumulate_gram_: tiles of rows in shared memory, one thread per (i, j) entry, grid-stride over
//   tiles, one atomicAdd per entry and block at the end (relaxed order: not bitwise deterministic).
// * ema_fold_: one warp per matrix; the finiteness check is a warp vote.
// * damped_cholesky_inverse: one warp per matrix for R <= 32 (4 matrices per block), one block of R
//   threads per matrix for 32 < R <= 64. Cholesky, L^-1 and L^-T L^-1 in shared memory; the status
//   codes and fallback chain of grit_kernels/status.py are decided on the device.
// * precondition_: grouped and in place. Every gradient is cut into tiles of ~4096 elements; a table
//   of (pointer, shape, module, first tile) for up to 96 gradients is passed BY VALUE as a kernel
//   argument (no host->device copy, nothing to keep alive: safe under CUDA-graph capture), and each
//   block finds its tile by binary search. The KL-clip dot product is reduced per block into one
//   float64 atomic.
// No host synchronisation anywhere; every launch is on the current stream.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace grit_cuda {
namespace {

constexpr int32_t kOk = 0, kRetried = 1, kKeptPrevious = 2, kScaledIdentity = 3;

// Every op validates all of its inputs before its first launch: a tensor on another device (the CPU, another
// GPU) would be read through a host or foreign pointer (an illegal address, which poisons the CUDA context of
// the whole process), and an error after a first launch would leave the outputs half written.
void check_on(const at::Tensor& t, const at::Device& device, const char* op, const char* what) {
  TORCH_CHECK(t.device() == device, op, ": ", what, " is on ", t.device(), " but the op runs on ", device,
              " (every tensor of one call must be on the same CUDA device)");
}

bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

bool is_grad_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble;
}

__device__ __forceinline__ int64_t i64min(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename G> struct Math { using T = float; };
template <> struct Math<double> { using T = double; };

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ double load_as_float(const double* p) { return *p; }
__device__ __forceinline__ float load_as_float(const at::BFloat16* p) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
}
__device__ __forceinline__ float load_as_float(const at::Half* p) { return __half2float(*reinterpret_cast<const __half*>(p)); }
__device__ __forceinline__ void store_from(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_from(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_from(at::BFloat16* p, float v) {
  *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store_from(at::Half* p, float v) { *reinterpret_cast<__half*>(p) = __float2half_rn(v); }

// --------------------------------------------------------------------------------------- Gram
constexpr int kGramThreads = 256, kGramMaxR = 64, kGramTileElems = 4096;

template <typename X, typename T>
__global__ void gram_kernel(const X* __restrict__ x, int64_t n, int r, T* __restrict__ out, int64_t ld, T weight) {
  __shared__ T tile[kGramTileElems];
  const int rows = kGramTileElems / r;
  const int pairs = r * r;
  constexpr int kPer = kGramMaxR * kGramMaxR / kGramThreads;  // entries per thread (<= 16)
  T acc[kPer];
#pragma unroll
  for (int q = 0; q < kPer; ++q) acc[q] = T(0);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows; t0 < n; t0 += static_cast<int64_t>(gridDim.x) * rows) {
    const int here = static_cast<int>(i64min(rows, n - t0));
    for (int e = threadIdx.x; e < here * r; e += blockDim.x) tile[e] = load_as_float(x + t0 * r + e);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int p = threadIdx.x + q * kGramThreads;
      if (p < pairs) {
        const int i = p / r, j = p % r;
        T s = 0;
        for (int t = 0; t < here; ++t) s += tile[t * r + i] * tile[t * r + j];
        acc[q] += s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int p = threadIdx.x + q * kGramThreads;
    if (p < pairs) atomicAdd(out + (p / r) * ld + (p % r), weight * acc[q]);
  }
}

void accumulate_gram_cuda(at::Tensor out, const at::Tensor& x, double weight) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == out.size(1) && x.size(-1) == out.size(0) && out.stride(1) == 1,
              "accumulate_gram_: out [r, r] (unit column stride) and x [..., r]");
  const int r = static_cast<int>(out.size(0));
  TORCH_CHECK(out.is_cuda(), "accumulate_gram_ (cuda): out must be a CUDA tensor, got ", out.device());
  check_on(x, out.device(), "accumulate_gram_", "x");
  TORCH_CHECK(r <= kGramMaxR, "accumulate_gram_ (cuda): r <= 64");
  TORCH_CHECK(is_float_or_double(out), "accumulate_gram_: out float32/64, got ", out.scalar_type());
  TORCH_CHECK(is_grad_dtype(x.scalar_type()), "accumulate_gram_: x must be float32/64, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.scalar_type() != at::kDouble || out.scalar_type() == at::kDouble,
              "accumulate_gram_: float64 x needs float64 out");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor x2 = x.reshape({-1, r}).contiguous();
  const int64_t n = x2.size(0);
  const int rows = kGramTileElems / r;
  const int blocks = static_cast<int>(std::min<int64_t>((n + rows - 1) / rows, 1024));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto* xp) {
    if (out.scalar_type() == at::kDouble)
      gram_kernel<<<blocks, kGramThreads, 0, stream>>>(xp, n, r, out.data_ptr<double>(), out.stride(0), weight);
    else
      gram_kernel<<<blocks, kGramThreads, 0, stream>>>(xp, n, r, out.data_ptr<float>(), out.stride(0),
                                                      static_cast<float>(weight));
  };
  switch (x2.scalar_type()) {
    case at::kFloat: launch(x2.data_ptr<float>()); break;
    case at::kBFloat16: launch(x2.data_ptr<at::BFloat16>()); break;
    case at::kHalf: launch(x2.data_ptr<at::Half>()); break;
    case at::kDouble:
      gram_kernel<<<blocks, kGramThreads, 0, stream>>>(x2.data_ptr<double>(), n, r, out.data_ptr<double>(),
                                                      out.stride(0), weight);
      break;
    default: TORCH_CHECK(false, "accumulate_gram_: x must be float32/64, bfloat16 or float16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------------- EMA fold
template <typename T>
__global__ void ema_fold_kernel(T* __restrict__ factor, const T* __restrict__ stat, const T* __restrict__ weight,
                                bool* __restrict__ init, int64_t n, int64_t rr, T decay) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (m >= n) return;
  const T w = weight[m];
  bool ok = w != T(0);
  for (int64_t k = lane; k < rr; k += 32) ok = ok && isfinite(w * stat[m * rr + k]);
  ok = __all_sync(0xffffffffu, ok);
  if (!ok) return;
  const bool was = init[m];
  for (int64_t k = lane; k < rr; k += 32) {
    const T step = w * stat[m * rr + k];
    factor[m * rr + k] = was ? decay * factor[m * rr + k] + (T(1) - decay) * step : step;
  }
  __syncwarp();
  if (lane == 0) init[m] = true;
}

void ema_fold_cuda(at::Tensor factor, const at::Tensor& stat_sum, const at::Tensor& weight, double decay,
                   at::Tensor initialized) {
  TORCH_CHECK(factor.dim() == 3 && stat_sum.sizes() == factor.sizes() && weight.numel() == factor.size(0) &&
                  initialized.numel() == factor.size(0) && factor.is_contiguous() && initialized.is_contiguous() &&
                  initialized.scalar_type() == at::kBool,
              "ema_fold_: factor/stat_sum [n, R, R] contiguous, weight [n], initialized [n] bool");
  TORCH_CHECK(factor.is_cuda(), "ema_fold_ (cuda): factor must be a CUDA tensor, got ", factor.device());
  check_on(stat_sum, factor.device(), "ema_fold_", "stat_sum");
  check_on(weight, factor.device(), "ema_fold_", "weight");
  check_on(initialized, factor.device(), "ema_fold_", "initialized");
  TORCH_CHECK(is_float_or_double(factor), "ema_fold_: factor float32/64, got ", factor.scalar_type());
  TORCH_CHECK(at::isFloatingType(stat_sum.scalar_type()) && at::isFloatingType(weight.scalar_type()),
              "ema_fold_: stat_sum and weight must be floating point, got ", stat_sum.scalar_type(), " and ",
              weight.scalar_type());
  const int64_t n = factor.size(0), rr = factor.size(1) * factor.size(2);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(factor.device());
  const at::Tensor s = stat_sum.to(factor.scalar_type()).contiguous();
  const at::Tensor w = weight.to(factor.scalar_type()).contiguous();
  const int warps = 8;
  const int blocks = static_cast<int>((n + warps - 1) / warps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (factor.scalar_type() == at::kDouble)
    ema_fold_kernel<<<blocks, 32 * warps, 0, stream>>>(factor.data_ptr<double>(), s.data_ptr<double>(),
                                                       w.data_ptr<double>(), initialized.data_ptr<bool>(), n, rr, decay);
  else {
    ema_fold_kernel<<<blocks, 32 * warps, 0, stream>>>(factor.data_ptr<float>(), s.data_ptr<float>(),
                                                       w.data_ptr<float>(), initialized.data_ptr<bool>(), n, rr,
                                                       static_cast<float>(decay));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------- damped inversion
// A team of `team` threads (a warp, or the whole block) inverts one matrix held in shared memory:
// a[R][R + 1] the damped factor, l[R][R + 1] its Cholesky factor, then L^-1 in place of l, then the
// inverse in place of a. Thread c owns column c (or row c) in every phase.
template <typename T>
__device__ void team_sync(bool warp) {
  if (warp) __syncwarp(); else __syncthreads();
}

template <typename T>
__device__ bool team_cholesky_inverse(const T* c, T* a, T* l, int r, int ld, T lam, int tid, int team, bool warp,
                                      int* flag) {
  team_sync<T>(warp);  // every thread has read the previous attempt's flag
  if (tid == 0) *flag = 1;
  for (int e = tid; e < r * r; e += team) a[(e / r) * ld + e % r] = c[(e / r) * ld + e % r];
  team_sync<T>(warp);
  for (int j = 0; j < r; ++j) {  // right-looking Cholesky, column j
    if (tid == 0) {
      T d = a[j * ld + j] + lam;
      for (int k = 0; k < j; ++k) d -= l[j * ld + k] * l[j * ld + k];
      if (!(d > T(0)) || !isfinite(d)) *flag = 0;
      l[j * ld + j] = sqrt(d > T(0) ? d : T(1));
    }
    team_sync<T>(warp);
    if (*flag == 0) return false;
    for (int i = j + 1 + tid; i < r; i += team) {
      T s = a[i * ld + j];
      for (int k = 0; k < j; ++k) s -= l[i * ld + k] * l[j * ld + k];
      l[i * ld + j] = s / l[j * ld + j];
    }
    team_sync<T>(warp);
  }
  // m = L^-1 (lower), column by column: thread c owns column c, written into the upper part of `a`
  // transposed (a[c][i] = m[i][c]) so that the inverse below reads rows.
  for (int c = tid; c < r; c += team) {
    a[c * ld + c] = T(1) / l[c * ld + c];
    for (int i = c + 1; i < r; ++i) {
      T s = 0;
      for (int k = c; k < i; ++k) s -= l[i * ld + k] * a[c * ld + k];
      a[c * ld + i] = s / l[i * ld + i];
    }
  }
  team_sync<T>(warp);
  // inverse[i][j] = sum_{k >= max(i, j)} m[k][i] m[k][j] (symmetric bit for bit), into l
  for (int e = tid; e < r * r; e += team) {
    const int i = e / r, j = e % r;
    T s = 0;
    for (int k = max(i, j); k < r; ++k) s += a[i * ld + k] * a[j * ld + k];
    l[i * ld + j] = s;
    if (!isfinite(s)) atomicAnd(flag, 0);
  }
  team_sync<T>(warp);
  return *flag != 0;
}

template <typename T>
__global__ void inverse_kernel(const T* __restrict__ mats, int64_t n, int R, const int64_t* __restrict__ ranks,
                               const T* __restrict__ previous, const bool* __restrict__ valid, T damping, T eps_abs,
                               T retry, T* __restrict__ out, int32_t* __restrict__ status, int team) {
  extern __shared__ __align__(8) unsigned char smem_raw[];  // read as float or double
  const int per_block = blockDim.x / team;
  const int local = threadIdx.x / team, tid = threadIdx.x % team;
  const bool warp = team <= 32;
  const int ld = R + 1;
  T* base = reinterpret_cast<T*>(smem_raw) + static_cast<size_t>(local) * (3 * R * ld + 2);
  T* c = base;
  T* a = c + R * ld;
  T* l = a + R * ld;
  __shared__ int flags[32];
  int* flag = flags + local;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * per_block + local;
  if (m >= n) return;  // whole teams exit together
  const int r = static_cast<int>(i64min(ranks[m] > 1 ? ranks[m] : 1, R));
  const T* src = mats + m * R * R;
  // load the leading r x r block; finiteness and trace
  int finite = 1;
  for (int e = tid; e < r * r; e += team) {
    const T v = src[(e / r) * R + e % r];
    c[(e / r) * ld + e % r] = v;
    finite &= isfinite(v) ? 1 : 0;
  }
  if (warp) finite = __all_sync(0xffffffffu, finite);
  else finite = __syncthreads_and(finite);
  team_sync<T>(warp);
  T trace = 0;
  for (int p = 0; p < r; ++p) trace += c[p * ld + p];
  const T lam = damping * trace / static_cast<T>(r) + eps_abs;
  int code = kScaledIdentity;
  bool done = false;
  if (finite && isfinite(lam)) {
    if (team_cholesky_inverse<T>(c, a, l, r, ld, lam, tid, team, warp, flag)) {
      code = kOk, done = true;
    } else if (team_cholesky_inverse<T>(c, a, l, r, ld, lam * retry, tid, team, warp, flag)) {
      code = kRetried, done = true;
    }
  }
  if (!done && previous != nullptr && valid[m]) {
    for (int e = tid; e < r * r; e += team) l[(e / r) * ld + e % r] = previous[m * R * R + (e / r) * R + e % r];
    code = kKeptPrevious, done = true;
  }
  if (!done) {
    const T diag = (isfinite(lam) && lam > T(0)) ? T(1) / lam : T(1);
    for (int e = tid; e < r * r; e += team) l[(e / r) * ld + e % r] = (e / r == e % r) ? diag : T(0);
  }
  team_sync<T>(warp);
  T* dst = out + m * R * R;
  for (int e = tid; e < R * R; e += team) {
    const int p = e / R, q = e % R;
    dst[e] = (p < r && q < r) ? T(0.5) * (l[p * ld + q] + l[q * ld + p]) : T(p == q ? 1 : 0);
  }
  if (tid == 0) status[m] = code;
}

std::tuple<at::Tensor, at::Tensor> damped_cholesky_inverse_cuda(const at::Tensor& mats_in, double damping,
                                                                 double eps_abs, const at::Tensor& ranks_in,
                                                                 const c10::optional<at::Tensor>& previous_in,
                                                                 const c10::optional<at::Tensor>& valid_in,
                                                                 double retry_factor) {
  TORCH_CHECK(mats_in.dim() == 3 && mats_in.size(1) == mats_in.size(2), "damped_cholesky_inverse: mats [n, R, R]");
  TORCH_CHECK(mats_in.scalar_type() == at::kFloat || mats_in.scalar_type() == at::kDouble,
              "damped_cholesky_inverse: float32/64");
  const int64_t n = mats_in.size(0);
  const int R = static_cast<int>(mats_in.size(1));
  TORCH_CHECK(R <= 64, "damped_cholesky_inverse (cuda): R <= 64");
  TORCH_CHECK(mats_in.is_cuda(), "damped_cholesky_inverse (cuda): mats must be a CUDA tensor, got ", mats_in.device());
  const int64_t n_in = mats_in.size(0);
  check_on(ranks_in, mats_in.device(), "damped_cholesky_inverse", "ranks");
  TORCH_CHECK(ranks_in.dim() == 1 && ranks_in.size(0) == n_in && at::isIntegralType(ranks_in.scalar_type(), false),
              "damped_cholesky_inverse: ranks must be an integer [n] tensor (n = ", n_in, "), got ",
              ranks_in.scalar_type(), " ", ranks_in.sizes());
  if (previous_in.has_value() && valid_in.has_value()) {
    check_on(*previous_in, mats_in.device(), "damped_cholesky_inverse", "previous");
    check_on(*valid_in, mats_in.device(), "damped_cholesky_inverse", "previous_valid");
    TORCH_CHECK(previous_in->sizes() == mats_in.sizes() && at::isFloatingType(previous_in->scalar_type()),
                "damped_cholesky_inverse: previous must be floating point and shaped like mats ", mats_in.sizes(),
                ", got ", previous_in->scalar_type(), " ", previous_in->sizes());
    TORCH_CHECK(valid_in->dim() == 1 && valid_in->size(0) == n_in &&
                    (valid_in->scalar_type() == at::kBool || at::isIntegralType(valid_in->scalar_type(), false)),
                "damped_cholesky_inverse: previous_valid must be a bool [n] tensor (n = ", n_in, "), got ",
                valid_in->scalar_type(), " ", valid_in->sizes());
  }
  const c10::cuda::CUDAGuard guard(mats_in.device());
  const at::Tensor mats = mats_in.contiguous();
  const at::Tensor ranks = ranks_in.to(at::kLong).contiguous();
  const bool has_prev = previous_in.has_value() && valid_in.has_value();
  at::Tensor previous, valid;
  if (has_prev) {
    previous = previous_in->to(mats.scalar_type()).contiguous();
    valid = valid_in->to(at::kBool).contiguous();
  }
  at::Tensor out = at::empty_like(mats);
  at::Tensor status = at::empty({n}, mats.options().dtype(at::kInt));
  if (n == 0) return {out, status};
  const int team = R <= 32 ? 32 : R;
  const int per_block = R <= 32 ? 4 : 1;
  const int blocks = static_cast<int>((n + per_block - 1) / per_block);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto* mp) {
    using T = std::remove_pointer_t<decltype(mp)>;
    const size_t smem = static_cast<size_t>(per_block) * (3 * R * (R + 1) + 2) * sizeof(T);
    auto kernel = inverse_kernel<T>;
    if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<blocks, team * per_block, smem, stream>>>(
        mp, n, R, ranks.data_ptr<int64_t>(), has_prev ? previous.data_ptr<T>() : nullptr,
        has_prev ? valid.data_ptr<bool>() : nullptr, static_cast<T>(damping), static_cast<T>(eps_abs),
        static_cast<T>(retry_factor), out.data_ptr<T>(), status.data_ptr<int32_t>(), team);
  };
  if (mats.scalar_type() == at::kDouble) launch(mats.data_ptr<double>());
  else launch(mats.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, status};
}

// ------------------------------------------------------------------------------- precondition
constexpr int kMaxEntries = 96, kPreThreads = 256;
// shared tile: 4096 float32 (16 KiB) or 1024 float64 (8 KiB; with the 32 KiB float64 P this fits 48 KiB)
#define GRIT_TILE_ELEMS(T) (sizeof(T) == 8 ? 1024 : 4096)

struct Entry {
  void* ptr;
  int64_t len;        // columns (left, grad_A [r, len]) or rows (right, grad_B [len, r])
  int64_t ld;         // row stride
  int32_t first_tile; // prefix sum of tiles
  int16_t r;
  int16_t left;
  int32_t module;
  int32_t span;       // columns or rows per tile
};

struct Table {
  Entry e[kMaxEntries];
  int32_t count;
};

template <typename G, typename T>
__global__ void precondition_kernel(const __grid_constant__ Table table, const float* __restrict__ inv_d32,
                                    const float* __restrict__ inv_h32, const double* __restrict__ inv_d64,
                                    const double* __restrict__ inv_h64, int R, double* __restrict__ dot) {
  __shared__ T tile[GRIT_TILE_ELEMS(T)];
  __shared__ T p[64 * 64];
  __shared__ double warp_dot[kPreThreads / 32];
  // which gradient and tile: binary search over first_tile
  int lo = 0, hi = table.count - 1;
  const int b = blockIdx.x;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.e[mid].first_tile <= b) lo = mid; else hi = mid - 1;
  }
  const Entry& en = table.e[lo];
  const int r = en.r;
  const int64_t start = static_cast<int64_t>(b - en.first_tile) * en.span;
  const int span = static_cast<int>(i64min(en.span, en.len - start));
  G* g = static_cast<G*>(en.ptr);
  const int64_t moff = static_cast<int64_t>(en.module) * R * R;
  for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
    const int i = e / r, j = e % r;
    const int64_t o = moff + static_cast<int64_t>(i) * R + j;
    p[e] = en.left ? (inv_d64 ? T(inv_d64[o]) : T(inv_d32[o])) : (inv_h64 ? T(inv_h64[o]) : T(inv_h32[o]));
  }
  double my_dot = 0;
  if (en.left) {  // tile = g[:, start:start+span] as [r][span]
    for (int e = threadIdx.x; e < r * span; e += blockDim.x) {
      const int k = e / span, c = e % span;
      tile[e] = load_as_float(g + k * en.ld + start + c);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < r * span; e += blockDim.x) {
      const int i = e / span, c = e % span;
      T acc = 0;
      for (int k = 0; k < r; ++k) acc += p[i * r + k] * tile[k * span + c];
      my_dot += static_cast<double>(acc * tile[e]);
      store_from(g + i * en.ld + start + c, acc);
    }
  } else {  // tile = g[start:start+span, :] as [span][r]
    for (int e = threadIdx.x; e < span * r; e += blockDim.x) {
      const int row = e / r, k = e % r;
      tile[e] = load_as_float(g + (start + row) * en.ld + k);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < span * r; e += blockDim.x) {
      const int row = e / r, j = e % r;
      T acc = 0;
      for (int k = 0; k < r; ++k) acc += tile[row * r + k] * p[k * r + j];
      my_dot += static_cast<double>(acc * tile[e]);
      store_from(g + (start + row) * en.ld + j, acc);
    }
  }
  if (dot == nullptr) return;
  for (int off = 16; off > 0; off /= 2) my_dot += __shfl_down_sync(0xffffffffu, my_dot, off);
  if (threadIdx.x % 32 == 0) warp_dot[threadIdx.x / 32] = my_dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int w = 0; w < kPreThreads / 32; ++w) s += warp_dot[w];
    atomicAdd(dot, s);
  }
}

at::Tensor precondition_cuda(at::TensorList grads_a, at::TensorList grads_b, const at::Tensor& inv_d_in,
                             const at::Tensor& inv_h_in, bool compute_dot) {
  const int64_t M = static_cast<int64_t>(grads_a.size());
  TORCH_CHECK(static_cast<int64_t>(grads_b.size()) == M && inv_d_in.dim() == 3 && inv_d_in.size(0) >= M &&
                  inv_h_in.sizes() == inv_d_in.sizes(),
              "precondition_: one lora_A and one lora_B grad per module and [M, R, R] inverses");
  const int R = static_cast<int>(inv_d_in.size(1));
  TORCH_CHECK(R <= 64, "precondition_ (cuda): R <= 64");
  TORCH_CHECK(inv_d_in.is_cuda(), "precondition_ (cuda): inv_d must be a CUDA tensor, got ", inv_d_in.device());
  const at::Device device = inv_d_in.device();
  check_on(inv_h_in, device, "precondition_", "inv_h");
  TORCH_CHECK(is_float_or_double(inv_d_in) && at::isFloatingType(inv_h_in.scalar_type()),
              "precondition_: inv_d must be float32/64 and inv_h floating point, got ", inv_d_in.scalar_type(), " and ",
              inv_h_in.scalar_type());
  // Every gradient is checked before the first launch: an error must not leave some gradients preconditioned.
  for (int side = 0; side < 2; ++side) {
    for (int64_t i = 0; i < M; ++i) {
      const at::Tensor& g = side == 0 ? grads_a[i] : grads_b[i];
      const char* what = side == 0 ? "lora_A gradient" : "lora_B gradient";
      TORCH_CHECK(g.device() == device, "precondition_: ", what, " ", i, " is on ", g.device(),
                  " but the inverses are on ", device);
      TORCH_CHECK(g.dim() == 2 && g.stride(1) == 1, "precondition_: ", what, " ", i,
                  " must be 2-D with unit column stride, got sizes ", g.sizes(), " strides ", g.strides());
      TORCH_CHECK(is_grad_dtype(g.scalar_type()), "precondition_: ", what, " ", i,
                  " must be float32/64, bfloat16 or float16, got ", g.scalar_type());
      const int64_t r = side == 0 ? g.size(0) : g.size(1);
      TORCH_CHECK(r >= 1 && r <= R, "precondition_: ", what, " ", i, " has rank ", r, " outside [1, ", R, "]");
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  const bool f64 = inv_d_in.scalar_type() == at::kDouble;
  const at::Tensor inv_d = inv_d_in.contiguous(), inv_h = inv_h_in.to(inv_d.scalar_type()).contiguous();
  at::Tensor dot = at::zeros({}, inv_d.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  // one table per gradient dtype, flushed every kMaxEntries gradients
  for (const auto st : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    Table table{};
    int32_t tiles = 0;
    auto flush = [&]() {
      if (table.count == 0) return;
      auto go = [&](auto* tag) {
        using G = std::remove_pointer_t<decltype(tag)>;
        using T = typename Math<G>::T;
        precondition_kernel<G, T><<<tiles, kPreThreads, 0, stream>>>(
            table, f64 ? nullptr : inv_d.data_ptr<float>(), f64 ? nullptr : inv_h.data_ptr<float>(),
            f64 ? inv_d.data_ptr<double>() : nullptr, f64 ? inv_h.data_ptr<double>() : nullptr, R,
            compute_dot ? dot.data_ptr<double>() : nullptr);
      };
      switch (st) {
        case at::kFloat: go(static_cast<float*>(nullptr)); break;
        case at::kBFloat16: go(static_cast<at::BFloat16*>(nullptr)); break;
        case at::kHalf: go(static_cast<at::Half*>(nullptr)); break;
        default: go(static_cast<double*>(nullptr)); break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      table = Table{};
      tiles = 0;
    };
    for (int side = 0; side < 2; ++side) {
      for (int64_t i = 0; i < M; ++i) {
        const at::Tensor& g = side == 0 ? grads_a[i] : grads_b[i];
        if (g.scalar_type() != st) continue;  // validated above
        const int r = static_cast<int>(side == 0 ? g.size(0) : g.size(1));
        const int64_t len = side == 0 ? g.size(1) : g.size(0);
        if (len == 0) continue;
        const int span = std::max(1, (st == at::kDouble ? GRIT_TILE_ELEMS(double) : GRIT_TILE_ELEMS(float)) / r);
        Entry& en = table.e[table.count++];
        en = Entry{g.data_ptr(), len, g.stride(0), tiles, static_cast<int16_t>(r), static_cast<int16_t>(side == 0),
                   static_cast<int32_t>(i), span};
        tiles += static_cast<int32_t>((len + span - 1) / span);
        if (table.count == kMaxEntries) flush();
      }
    }
    flush();
  }
  return dot.to(at::kFloat);
}

}  // namespace
}  // namespace grit_cuda

TORCH_LIBRARY_IMPL(grit_kernels_cpp, CUDA, m) {
  m.impl("accumulate_gram_", &grit_cuda::accumulate_gram_cuda);
  m.impl("ema_fold_", &grit_cuda::ema_fold_cuda);
  m.impl("damped_cholesky_inverse", &grit_cuda::damped_cholesky_inverse_cuda);
  m.impl("precondition_", &grit_cuda::precondition_cuda);
}
