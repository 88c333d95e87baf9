// The tail-holding sampler's candidate prompts (loopicl/linear/tail_sampling.py), drawn and scored
// in one pass on the CPU (XLA FFI).
//
// A candidate c of a step is the d × n matrix G_c of standard normals whose element e = i·n + m
// is normal(philox4x32_10(counter = (c, e / 4, 0, 0), key)[e % 4]): a pure function of (key, c, e),
// so a candidate can be scored without the pool ever being stored, and the few chosen ones drawn
// again — the same bits — for the batch.  loopicl/prng.py computes the same numbers with jnp (the
// XLA path and the tests' reference).
//
//   CandidateScores: key [..., 2] → λ_max((1/n) G_c G_cᵀ) [..., count]   (the sampler's power
//                    iteration: start at the column of largest norm, `iterations` products,
//                    Rayleigh quotient)
//   CandidateInputs: key [..., 2], c [..., k] → G_c [..., k, d, n]
//
// Why: the pool is pool · batch · d · n normals a step (64 · 128 · 10 · 15 at n/d = 1.5, T = 20;
// 4 seeds: 4.9 M), and XLA's threefry + erf⁻¹ draw of them cost more than the model's whole step.
// Here the candidates are the SIMD lanes: Philox is two 32 × 32 → 64-bit products a round per lane,
// and the normal is the inverse CDF (Giles' single-precision erf⁻¹, XLA's own, with a Cephes log)
// of a uniform on the 2^23 midpoints (k + ½)·2^-22 − 1 of (−1, 1): symmetric, never ±1, |z| ≤ 5.3.

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using loopicl::kLanes;
using loopicl::ParallelBlocks;
using loopicl::Workers;
using loopicl::splat;
using loopicl::vec;

typedef uint32_t uvec __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint64_t wvec __attribute__((vector_size(kLanes * sizeof(uint32_t))));  // lane pairs

struct Four {
  uvec x[4];
};

// (high, low) 32 bits of m · x per lane.  The lanes pair up into 64-bit words whose even and odd
// halves are multiplied as zero-extended 32-bit numbers (one vpmuludq each on x86, where a full
// 64-bit vector multiply would be ~3× the work).
inline void MulHiLo(uint32_t m, uvec x, uvec& hi, uvec& lo) {
  const wvec w = (wvec)x, mask = wvec{} + 0xFFFFFFFFull;
  const wvec even = (w & mask) * static_cast<uint64_t>(m), odd = (w >> 32) * static_cast<uint64_t>(m);
  lo = (uvec)((even & mask) | (odd << 32));
  hi = (uvec)((even >> 32) | (odd & ~mask));
}

// Philox4x32-10 (Salmon et al. 2011, Random123's constants), one counter (c0, c1, 0, 0) per lane.
inline Four Philox(uvec c0, uvec c1, uint32_t k0, uint32_t k1) {
  uvec x0 = c0, x1 = c1, x2 = uvec{}, x3 = uvec{};
  for (int round = 0; round < 10; ++round) {
    uvec hi0, lo0, hi1, lo1;
    MulHiLo(0xD2511F53u, x0, hi0, lo0);
    MulHiLo(0xCD9E8D57u, x2, hi1, lo1);
    x0 = hi1 ^ x1 ^ k0;
    x1 = lo1;
    x2 = hi0 ^ x3 ^ k1;
    x3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{x0, x1, x2, x3}};
}

inline vec Sqrt(vec x) {
#if defined(__AVX512F__)
  return (vec)_mm512_sqrt_ps((__m512)x);
#elif defined(__AVX__)
  return (vec)_mm256_sqrt_ps((__m256)x);
#else
  for (int l = 0; l < kLanes; ++l) x[l] = std::sqrt(x[l]);
  return x;
#endif
}

// log(x) for normal x > 0 (Cephes logf: x = m·2^e, m ∈ [√½, √2), a degree-9 polynomial in m − 1).
inline vec Log(vec x) {
  const ivec bits = (ivec)x;
  ivec e = ((bits >> 23) & 0xff) - 126;  // x = f·2^e, f ∈ [½, 1)
  vec f = (vec)((bits & 0x007fffff) | 0x3f000000);
  const ivec small = f < 0.70710678f;  // −1 where f < √½: use 2f, e − 1
  e += small;
  f = small ? f + f - 1.0f : f - 1.0f;
  const vec z = f * f;
  vec y = splat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const vec ef = __builtin_convertvector(e, vec);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return f + y + 0.693359375f * ef;
}

// Standard normals from 32 random bits a lane: √2 · erf⁻¹(u), u = (k + ½)·2^-22 − 1, k = bits >> 9.
inline vec Normal(uvec bits) {
  const vec k = __builtin_convertvector((ivec)(bits >> 9), vec);  // exact: k < 2^23
  const vec u = (k + 0.5f) * (1.0f / 4194304.0f) - 1.0f;         // exact
  const vec w = -Log((1.0f - u) * (1.0f + u));
  const vec a = w - 2.5f, b = Sqrt(w) - 3.0f;
  vec p = splat(2.81022636e-08f), q = splat(-0.000200214257f);
  p = 3.43273939e-07f + p * a;  q = 0.000100950558f + q * b;
  p = -3.5233877e-06f + p * a;  q = 0.00134934322f + q * b;
  p = -4.39150654e-06f + p * a; q = -0.00367342844f + q * b;
  p = 0.00021858087f + p * a;   q = 0.00573950773f + q * b;
  p = -0.00125372503f + p * a;  q = -0.0076224613f + q * b;
  p = -0.00417768164f + p * a;  q = 0.00943887047f + q * b;
  p = 0.246640727f + p * a;     q = 1.00167406f + q * b;
  p = 1.50140941f + p * a;      q = 2.83297682f + q * b;
  return 1.41421356237f * ((w < 5.0f) ? p : q) * u;
}

// G [d·n] of the lanes' candidates c (noinline: the score pass and the batch pass run the same
// instructions, so a chosen candidate's inputs are bit for bit the ones that were scored).
__attribute__((noinline)) void Draw(uvec c, uint32_t k0, uint32_t k1, int64_t size, vec* g) {
  for (int64_t j = 0; 4 * j < size; ++j) {
    const Four r = Philox(c, uvec{} + static_cast<uint32_t>(j), k0, k1);
    for (int64_t t = 0; t < 4 && 4 * j + t < size; ++t) g[4 * j + t] = Normal(r.x[t]);
  }
}

// λ_max((1/n) G Gᵀ) per lane by the sampler's power iteration (tail_sampling._power_lambda_max).
vec LambdaMax(const vec* g, int64_t d, int64_t n, int64_t iterations, vec* S, vec* v, vec* w) {
  const vec inv_n = splat(1.0f / static_cast<float>(n));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      vec acc{};
      for (int64_t m = 0; m < n; ++m) acc += g[i * n + m] * g[j * n + m];
      S[i * d + j] = S[j * d + i] = acc * inv_n;
    }
  vec best_norm = splat(-1.0f);
  for (int64_t i = 0; i < d; ++i) v[i] = vec{};
  for (int64_t j = 0; j < d; ++j) {  // start at the column of largest norm (the first of ties)
    vec norm{};
    for (int64_t i = 0; i < d; ++i) norm += S[i * d + j] * S[i * d + j];
    for (int64_t l = 0; l < kLanes; ++l)
      if (norm[l] > best_norm[l]) {
        best_norm[l] = norm[l];
        for (int64_t i = 0; i < d; ++i) v[i][l] = S[i * d + j][l];
      }
  }
  for (int64_t it = 0; it < iterations; ++it) {
    vec norm{};
    for (int64_t i = 0; i < d; ++i) {
      vec acc{};
      for (int64_t j = 0; j < d; ++j) acc += S[i * d + j] * v[j];
      w[i] = acc;
      norm += acc * acc;
    }
    vec inv{};
    for (int64_t l = 0; l < kLanes; ++l) inv[l] = norm[l] > 0.0f ? 1.0f / std::sqrt(norm[l]) : 0.0f;
    for (int64_t i = 0; i < d; ++i) v[i] = w[i] * inv;
  }
  vec q{};
  for (int64_t i = 0; i < d; ++i) {
    vec acc{};
    for (int64_t j = 0; j < d; ++j) acc += S[i * d + j] * v[j];
    q += v[i] * acc;
  }
  return q;
}

// Models: the leading dimensions of key [..., 2] (vmap over seeds, "broadcast_all").
int64_t Models(ffi::Buffer<ffi::U32>& key) {
  return static_cast<int64_t>(key.element_count()) / 2;
}

bool PairMinor(ffi::Buffer<ffi::U32>& key) {
  auto dims = key.dimensions();
  return dims.size() >= 1 && dims[dims.size() - 1] == 2;
}

ffi::Error CandidateScores(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> key, int64_t count, int64_t d,
                           int64_t n, int64_t iterations, int64_t threads,
                           ffi::ResultBuffer<ffi::F32> out) {
  const int64_t models = Models(key);
  if (d < 1 || n < 1 || count < 1 || !PairMinor(key) ||
      static_cast<int64_t>(out->element_count()) != models * count)
    return ffi::Error::InvalidArgument("key must be [..., 2] and the scores [..., count]");
  const uint32_t* k = key.typed_data();
  float* o = out->typed_data();
  const int64_t per_model = (count + kLanes - 1) / kLanes;
  ParallelBlocks(pool, models * per_model, Workers(pool, threads), [&](int64_t b, int64_t) {
    const int64_t a = b / per_model, first = (b % per_model) * kLanes;
    std::vector<vec> g(d * n), S(d * d), v(d), w(d);
    uvec c;
    for (int l = 0; l < kLanes; ++l) c[l] = static_cast<uint32_t>(first + l);
    Draw(c, k[2 * a], k[2 * a + 1], d * n, g.data());
    const vec q = LambdaMax(g.data(), d, n, iterations, S.data(), v.data(), w.data());
    for (int64_t l = 0; l < std::min<int64_t>(kLanes, count - first); ++l) o[a * count + first + l] = q[l];
  });
  return ffi::Error::Success();
}

ffi::Error CandidateInputs(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> key, ffi::Buffer<ffi::S32> chosen,
                           int64_t d, int64_t n, int64_t threads, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t models = Models(key);
  const int64_t k_count = models > 0 ? static_cast<int64_t>(chosen.element_count()) / models : 0;
  if (d < 1 || n < 1 || !PairMinor(key) || k_count * models != static_cast<int64_t>(chosen.element_count()) ||
      static_cast<int64_t>(out->element_count()) != models * k_count * d * n)
    return ffi::Error::InvalidArgument("key must be [..., 2], chosen [..., k] and the inputs [..., k, d, n]");
  const uint32_t* k = key.typed_data();
  const int32_t* idx = chosen.typed_data();
  float* o = out->typed_data();
  const int64_t size = d * n, per_model = (k_count + kLanes - 1) / kLanes;
  ParallelBlocks(pool, models * per_model, Workers(pool, threads), [&](int64_t b, int64_t) {
    const int64_t a = b / per_model, first = (b % per_model) * kLanes;
    const int64_t lanes = std::min<int64_t>(kLanes, k_count - first);
    std::vector<vec> g(size);
    uvec c{};
    for (int64_t l = 0; l < lanes; ++l) c[l] = static_cast<uint32_t>(idx[a * k_count + first + l]);
    Draw(c, k[2 * a], k[2 * a + 1], size, g.data());
    for (int64_t l = 0; l < lanes; ++l) {
      float* dst = o + (a * k_count + first + l) * size;
      for (int64_t e = 0; e < size; ++e) dst[e] = g[e][l];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopiclCandidateScores, CandidateScores,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()   // key [..., 2]
                                  .Attr<int64_t>("count")
                                  .Attr<int64_t>("d")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("iterations")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // λ_max [..., count]

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopiclCandidateInputs, CandidateInputs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()   // key [..., 2]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // chosen candidates [..., k]
                                  .Attr<int64_t>("d")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // G [..., k, d, n]
