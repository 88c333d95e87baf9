// The looped linear transformer's loop, forward and backward, as one CPU kernel (XLA FFI).  The
// tail-holding sampler's candidate draw is its sibling, candidates.cc; both share simd.h.
//
// Same math as loopicl/linear/model.py (reassociated form), per prompt and loop t:
//
//   C = Z[:, :n]                    context columns                     [D, n]
//   G = C Cᵀ                        Z M Zᵀ (symmetric)                  [D, D]
//   H = G Q                                                              [D, D]
//   W = P H / n                                                          [D, D]
//   Z ← Z + W Z                                                          [D, N]
//   readout[t] = −Z[d:, n:]                                              [d_out, m]
//
// Why a kernel: XLA's CPU backend runs these per-prompt 21 × 41 products as batched dots at
// 20–40 GFLOP/s plus a transpose/copy per product (docs/scaling.md).  Here the batch is the SIMD
// lane: a block of L prompts is stored lane-minor ([D][N] vectors of L floats), so every product
// is a dense loop of vector FMAs with no lane wasted whatever D and n are, blocks run in parallel
// on XLA's intra-op thread pool, and the whole loop (all T steps) is one call.
//
// Determinism: the gradient of the shared (P, Q) is summed per block (lanes in order 0..L-1) into
// its own slot, then over blocks in block order by the caller thread, so the result does not
// depend on which thread ran which block.
//
// Residuals (forward → backward), per block and loop: Z_t [D][N], G_t, H_t, W_t [D][D], all as
// L-lane vectors; `remat` recomputes them per block in the backward instead.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using loopicl::kLanes;
using loopicl::vec;
using loopicl::splat;
using loopicl::ParallelBlocks;
using loopicl::Workers;

#if defined(__AVX512F__)
constexpr int kTile = 4;  // 4 × 4 accumulators + 8 operands fit the 32 vector registers
#else
constexpr int kTile = 3;  // 16 registers (AVX2 / NEON-sized): 3 × 3 accumulators + 6 operands
#endif

// Operands of the small products: a matrix of lane vectors (R: read, V: written), or of scalars
// shared by all lanes (S), addressed through (row, column) strides so that a transpose is only a
// swap of strides.
struct R {
  const vec* p;
  int64_t rs, cs;
  vec get(int64_t r, int64_t c) const { return p[r * rs + c * cs]; }
};
struct V {
  vec* p;
  int64_t rs, cs;
  vec& at(int64_t r, int64_t c) const { return p[r * rs + c * cs]; }
  vec get(int64_t r, int64_t c) const { return p[r * rs + c * cs]; }
};
struct S {
  const float* p;
  int64_t rs, cs;
  vec get(int64_t r, int64_t c) const { return splat(p[r * rs + c * cs]); }
};

// out(i, j) = [out(i, j) if accumulate] + Σ_k a(i, k) b(k, j) over one TI × TJ tile.
template <int TI, int TJ, class A, class B>
inline void Tile(const A& a, const B& b, const V& out, int64_t i0, int64_t j0, int64_t K,
                 bool accumulate) {
  vec acc[TI][TJ];
  for (int x = 0; x < TI; ++x)
    for (int y = 0; y < TJ; ++y) acc[x][y] = accumulate ? out.get(i0 + x, j0 + y) : vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec av[TI], bv[TJ];
    for (int x = 0; x < TI; ++x) av[x] = a.get(i0 + x, k);
    for (int y = 0; y < TJ; ++y) bv[y] = b.get(k, j0 + y);
    for (int x = 0; x < TI; ++x)
      for (int y = 0; y < TJ; ++y) acc[x][y] += av[x] * bv[y];
  }
  for (int x = 0; x < TI; ++x)
    for (int y = 0; y < TJ; ++y) out.at(i0 + x, j0 + y) = acc[x][y];
}

template <int TI, class A, class B>
inline void TileRow(const A& a, const B& b, const V& out, int64_t i0, int64_t j0, int64_t tj,
                    int64_t K, bool accumulate) {
  switch (tj) {
    case 1: return Tile<TI, 1>(a, b, out, i0, j0, K, accumulate);
    case 2: return Tile<TI, 2>(a, b, out, i0, j0, K, accumulate);
    case 3: return Tile<TI, 3>(a, b, out, i0, j0, K, accumulate);
    case 4: return Tile<TI, 4>(a, b, out, i0, j0, K, accumulate);
  }
}

// out[I × J] (+)= a[I × K] · b[K × J]; with `lower`, only tiles on or below the diagonal
// (for a symmetric result, mirrored by the caller).
template <class A, class B>
void MatMul(const A& a, const B& b, const V& out, int64_t I, int64_t J, int64_t K,
            bool accumulate, bool lower = false) {
  for (int64_t i0 = 0; i0 < I; i0 += kTile) {
    const int64_t ti = std::min<int64_t>(kTile, I - i0);
    const int64_t j_end = lower ? std::min(J, i0 + ti) : J;
    for (int64_t j0 = 0; j0 < j_end; j0 += kTile) {
      const int64_t tj = std::min<int64_t>(kTile, j_end - j0);
      switch (ti) {
        case 1: TileRow<1>(a, b, out, i0, j0, tj, K, accumulate); break;
        case 2: TileRow<2>(a, b, out, i0, j0, tj, K, accumulate); break;
        case 3: TileRow<3>(a, b, out, i0, j0, tj, K, accumulate); break;
        case 4: TileRow<4>(a, b, out, i0, j0, tj, K, accumulate); break;
      }
    }
  }
}

struct Shape {
  int64_t batch, D, N, n, d_out, loops;
  int64_t d() const { return D - d_out; }
  int64_t m() const { return N - n; }
  int64_t blocks() const { return (batch + kLanes - 1) / kLanes; }
  int64_t state() const { return D * N; }                  // vectors in one Z
  int64_t record() const { return D * N + 3 * D * D; }     // Z_t, G_t, H_t, W_t
};

struct AlignedVecs {
  explicit AlignedVecs(int64_t count)
      : p(static_cast<vec*>(std::aligned_alloc(64, std::max<int64_t>(1, count) * sizeof(vec)))) {}
  ~AlignedVecs() { std::free(p); }
  vec* p;
};

// Z0 [batch, D, N] (row-major) → one block [D][N] of lane vectors; lanes past the batch are 0.
void Pack(const Shape& s, const float* Z0, int64_t block, vec* Z) {
  const int64_t first = block * kLanes, lanes = std::min<int64_t>(kLanes, s.batch - first);
  std::memset(static_cast<void*>(Z), 0, s.state() * sizeof(vec));
  for (int64_t l = 0; l < lanes; ++l) {
    const float* src = Z0 + (first + l) * s.state();
    for (int64_t e = 0; e < s.state(); ++e) Z[e][l] = src[e];
  }
}

// One forward loop: record = [Z_t | G | H | W] with Z_t already in place; writes Z_{t+1}.
void LoopStep(const Shape& s, const float* P_over_n, const float* Q, vec* record, vec* Z_next) {
  const int64_t D = s.D, N = s.N;
  vec* Z = record;
  vec* G = record + s.state();
  vec* H = G + D * D;
  vec* W = H + D * D;
  MatMul(R{Z, N, 1}, R{Z, 1, N}, V{G, D, 1}, D, D, s.n, false, /*lower=*/true);  // C Cᵀ
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j < i; ++j) G[j * D + i] = G[i * D + j];
  MatMul(R{G, D, 1}, S{Q, D, 1}, V{H, D, 1}, D, D, D, false);                     // G Q
  MatMul(S{P_over_n, D, 1}, R{H, D, 1}, V{W, D, 1}, D, D, D, false);              // P H / n
  std::memcpy(static_cast<void*>(Z_next), Z, s.state() * sizeof(vec));
  MatMul(R{W, D, 1}, R{Z, N, 1}, V{Z_next, N, 1}, D, N, D, true);                 // Z + W Z
}

// Forward over all loops of one block: records[t] for t < loops, readouts written per lane.
void ForwardBlock(const Shape& s, const float* P_over_n, const float* Q, const float* Z0,
                  int64_t block, vec* records, vec* Z_last, float* readouts) {
  Pack(s, Z0, block, records);
  const int64_t first = block * kLanes, lanes = std::min<int64_t>(kLanes, s.batch - first);
  const int64_t d = s.d(), m = s.m();
  for (int64_t t = 0; t < s.loops; ++t) {
    vec* record = records + t * s.record();
    vec* Z_next = t + 1 < s.loops ? records + (t + 1) * s.record() : Z_last;
    LoopStep(s, P_over_n, Q, record, Z_next);
    if (readouts == nullptr) continue;
    for (int64_t r = 0; r < s.d_out; ++r)
      for (int64_t q = 0; q < m; ++q) {
        const vec value = Z_next[(d + r) * s.N + s.n + q];
        for (int64_t l = 0; l < lanes; ++l)
          readouts[((t * s.batch + first + l) * s.d_out + r) * m + q] = -value[l];
      }
  }
}

// Backward over all loops of one block.  `ct`: readout cotangent [loops, batch, d_out, m].
// Adds this block's dP, dQ (lane-summed) to dPQ[0: D²], dPQ[D²: 2D²]; writes dZ0 rows.
void BackwardBlock(const Shape& s, const float* P_over_n, const float* Q, const vec* records,
                   const float* ct, int64_t block, vec* scratch, float* dPQ, float* dZ0) {
  const int64_t D = s.D, N = s.N, DD = D * D, d = s.d(), m = s.m();
  const int64_t first = block * kLanes, lanes = std::min<int64_t>(kLanes, s.batch - first);
  vec* dZ = scratch;               // cotangent of Z_{t+1}, then of Z_t
  vec* dZ_prev = dZ + s.state();
  vec* dW = dZ_prev + s.state();
  vec* dH = dW + DD;
  vec* dG = dH + DD;
  vec* dP = dG + DD;               // Σ_t dW Hᵀ (times 1/n at the end)
  vec* dQ = dP + DD;               // Σ_t G dH
  std::memset(static_cast<void*>(dZ), 0, s.state() * sizeof(vec));
  std::memset(static_cast<void*>(dP), 0, 2 * DD * sizeof(vec));
  for (int64_t t = s.loops - 1; t >= 0; --t) {
    const vec* Z = records + t * s.record();
    const vec* G = Z + s.state();
    const vec* H = G + DD;
    const vec* W = H + DD;
    for (int64_t r = 0; r < s.d_out; ++r)       // readout[t] = −Z_{t+1}[d:, n:]
      for (int64_t q = 0; q < m; ++q) {
        vec& target = dZ[(d + r) * N + s.n + q];
        for (int64_t l = 0; l < lanes; ++l)
          target[l] -= ct[((t * s.batch + first + l) * s.d_out + r) * m + q];
      }
    MatMul(R{dZ, N, 1}, R{Z, 1, N}, V{dW, D, 1}, D, D, N, false);               // dW = dZ Zᵀ
    std::memcpy(static_cast<void*>(dZ_prev), dZ, s.state() * sizeof(vec));
    MatMul(R{W, 1, D}, R{dZ, N, 1}, V{dZ_prev, N, 1}, D, N, D, true);           // + Wᵀ dZ
    MatMul(S{P_over_n, 1, D}, R{dW, D, 1}, V{dH, D, 1}, D, D, D, false);        // dH = Pᵀ dW / n
    MatMul(R{dW, D, 1}, R{H, 1, D}, V{dP, D, 1}, D, D, D, true);                // dP += dW Hᵀ
    MatMul(R{dH, D, 1}, S{Q, 1, D}, V{dG, D, 1}, D, D, D, false);               // dG = dH Qᵀ
    MatMul(R{G, D, 1}, R{dH, D, 1}, V{dQ, D, 1}, D, D, D, true);                // dQ += G dH
    for (int64_t i = 0; i < D; ++i)                                              // dG + dGᵀ
      for (int64_t j = 0; j <= i; ++j) {
        const vec sym = dG[i * D + j] + dG[j * D + i];
        dG[i * D + j] = sym;
        dG[j * D + i] = sym;
      }
    MatMul(R{dG, D, 1}, R{Z, N, 1}, V{dZ_prev, N, 1}, D, s.n, D, true);         // dC += (dG+dGᵀ) C
    std::swap(dZ, dZ_prev);
  }
  const float inv_n = 1.0f / static_cast<float>(s.n);
  for (int64_t e = 0; e < DD; ++e) {
    float p = 0.0f, q = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) {  // padded lanes are exactly 0
      p += dP[e][l];
      q += dQ[e][l];
    }
    dPQ[e] = p * inv_n;
    dPQ[DD + e] = q;
  }
  for (int64_t l = 0; l < lanes; ++l) {
    float* dst = dZ0 + (first + l) * s.state();
    for (int64_t e = 0; e < s.state(); ++e) dst[e] = dZ[e][l];
  }
}


// What both handlers start from: the shape (checked), P / n per model, and how many workers.
// Models: any leading dimensions of P, Q [..., D, D] and Z0 [..., batch, D, N] (vmap over seeds
// with "broadcast_all": one call trains K models).  Work items are (model, block) pairs, so the
// K models share the workers instead of running one after another.
struct Call {
  Shape s;
  int64_t models;
  std::vector<float> P_over_n;  // [models, D, D]
  int64_t workers;
};

ffi::Error Prepare(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> P, ffi::Buffer<ffi::F32> Q,
                   ffi::Buffer<ffi::F32> Z0, int64_t n_context, int64_t d_out, int64_t loops,
                   int64_t threads, Call& call) {
  auto dims = Z0.dimensions();
  const size_t rank = dims.size();
  if (rank < 3) return ffi::Error::InvalidArgument("Z0 must be [..., batch, D, N]");
  const Shape s{dims[rank - 3], dims[rank - 2], dims[rank - 1], n_context, d_out, loops};
  int64_t models = 1;
  for (size_t i = 0; i + 3 < rank; ++i) models *= dims[i];
  auto pd = P.dimensions();
  if (pd.size() != rank - 1 || pd[rank - 2] != s.D || pd[rank - 3] != s.D ||
      static_cast<int64_t>(P.element_count()) != models * s.D * s.D ||
      Q.element_count() != P.element_count())
    return ffi::Error::InvalidArgument("P, Q must be [..., D, D] with Z0's leading dimensions");
  if (s.n < 1 || s.n > s.N || s.d_out < 1 || s.d_out > s.D || s.loops < 1)
    return ffi::Error::InvalidArgument("bad n_context / d_out / loops");
  const float inv_n = 1.0f / static_cast<float>(s.n);
  call.s = s;
  call.models = models;
  call.P_over_n.assign(P.typed_data(), P.typed_data() + models * s.D * s.D);
  for (float& x : call.P_over_n) x *= inv_n;
  call.workers = Workers(pool, threads);
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> P, ffi::Buffer<ffi::F32> Q,
                   ffi::Buffer<ffi::F32> Z0, int64_t n_context, int64_t d_out, int64_t loops,
                   bool store, int64_t threads, ffi::ResultBuffer<ffi::F32> readouts,
                   ffi::ResultBuffer<ffi::F32> residuals) {
  Call call;
  if (auto e = Prepare(pool, P, Q, Z0, n_context, d_out, loops, threads, call); e.failure()) return e;
  const Shape& s = call.s;
  const int64_t DD = s.D * s.D, blocks = s.blocks(), per_block = s.loops * s.record();
  const int64_t readout_size = s.loops * s.batch * s.d_out * s.m();
  if (store &&
      static_cast<int64_t>(residuals->element_count()) != call.models * blocks * per_block * kLanes)
    return ffi::Error::InvalidArgument("residual buffer has the wrong size");
  std::vector<std::unique_ptr<AlignedVecs>> scratch(call.workers);
  vec* stored = reinterpret_cast<vec*>(residuals->typed_data());
  ParallelBlocks(pool, call.models * blocks, call.workers, [&](int64_t item, int64_t w) {
    const int64_t k = item / blocks, b = item % blocks;
    if (!scratch[w]) scratch[w] = std::make_unique<AlignedVecs>((store ? 1 : per_block) + s.state());
    vec* records = store ? stored + item * per_block : scratch[w]->p;
    vec* Z_last = store ? scratch[w]->p : scratch[w]->p + per_block;
    ForwardBlock(s, call.P_over_n.data() + k * DD, Q.typed_data() + k * DD,
                 Z0.typed_data() + k * s.batch * s.state(), b, records, Z_last,
                 readouts->typed_data() + k * readout_size);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> P, ffi::Buffer<ffi::F32> Q,
                    ffi::Buffer<ffi::F32> Z0, ffi::Buffer<ffi::F32> residuals,
                    ffi::Buffer<ffi::F32> ct, int64_t n_context, int64_t d_out, int64_t loops,
                    bool store, int64_t threads, ffi::ResultBuffer<ffi::F32> dP,
                    ffi::ResultBuffer<ffi::F32> dQ, ffi::ResultBuffer<ffi::F32> dZ0) {
  Call call;
  if (auto e = Prepare(pool, P, Q, Z0, n_context, d_out, loops, threads, call); e.failure()) return e;
  const Shape& s = call.s;
  const int64_t DD = s.D * s.D, blocks = s.blocks(), per_block = s.loops * s.record();
  const int64_t readout_size = s.loops * s.batch * s.d_out * s.m();
  std::vector<std::unique_ptr<AlignedVecs>> scratch(call.workers);
  std::vector<float> partial(call.models * blocks * 2 * DD);
  const int64_t backward_scratch = 2 * s.state() + 5 * DD;
  const vec* stored = reinterpret_cast<const vec*>(residuals.typed_data());
  ParallelBlocks(pool, call.models * blocks, call.workers, [&](int64_t item, int64_t w) {
    const int64_t k = item / blocks, b = item % blocks;
    const float* P_over_n = call.P_over_n.data() + k * DD;
    const float* Qk = Q.typed_data() + k * DD;
    const float* Z0k = Z0.typed_data() + k * s.batch * s.state();
    if (!scratch[w])
      scratch[w] = std::make_unique<AlignedVecs>(backward_scratch + (store ? 0 : per_block + s.state()));
    vec* base = scratch[w]->p;
    const vec* records = stored + item * per_block;
    if (!store) {  // remat: recompute this block's forward records
      vec* recomputed = base + backward_scratch;
      ForwardBlock(s, P_over_n, Qk, Z0k, b, recomputed, recomputed + per_block, nullptr);
      records = recomputed;
    }
    BackwardBlock(s, P_over_n, Qk, records, ct.typed_data() + k * readout_size, b, base,
                  partial.data() + item * 2 * DD, dZ0->typed_data() + k * s.batch * s.state());
  });
  float* out_P = dP->typed_data();
  float* out_Q = dQ->typed_data();
  std::fill(out_P, out_P + call.models * DD, 0.0f);
  std::fill(out_Q, out_Q + call.models * DD, 0.0f);
  for (int64_t k = 0; k < call.models; ++k)
    for (int64_t b = 0; b < blocks; ++b) {  // block order: the same sum whatever thread ran what
      const float* part = partial.data() + (k * blocks + b) * 2 * DD;
      for (int64_t e = 0; e < DD; ++e) {
        out_P[k * DD + e] += part[e];
        out_Q[k * DD + e] += part[DD + e];
      }
    }
  return ffi::Error::Success();
}

}  // namespace

// The attributes both handlers take, in this order after their buffers.
template <class Binding>
auto LoopAttributes(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("n_context")
      .template Attr<int64_t>("d_out")
      .template Attr<int64_t>("loops")
      .template Attr<bool>("store")
      .template Attr<int64_t>("threads");
}

extern "C" int64_t loopicl_lanes() { return kLanes; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopiclForward, Forward,
                              LoopAttributes(ffi::Ffi::Bind()
                                                 .Ctx<ffi::ThreadPool>()
                                                 .Arg<ffi::Buffer<ffi::F32>>()   // P
                                                 .Arg<ffi::Buffer<ffi::F32>>()   // Q
                                                 .Arg<ffi::Buffer<ffi::F32>>())  // Z0
                                  .Ret<ffi::Buffer<ffi::F32>>()    // readouts
                                  .Ret<ffi::Buffer<ffi::F32>>());  // residuals

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopiclBackward, Backward,
                              LoopAttributes(ffi::Ffi::Bind()
                                                 .Ctx<ffi::ThreadPool>()
                                                 .Arg<ffi::Buffer<ffi::F32>>()   // P
                                                 .Arg<ffi::Buffer<ffi::F32>>()   // Q
                                                 .Arg<ffi::Buffer<ffi::F32>>()   // Z0
                                                 .Arg<ffi::Buffer<ffi::F32>>()   // residuals
                                                 .Arg<ffi::Buffer<ffi::F32>>())  // readout cotangent
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dP
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dQ
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dZ0
