// Which rows (i_1, ..., i_m) form each sample of a sample set, and — for the deterministic
// backward — which samples each output row owns (reading order: 2, after device_math.cuh).
//
// Everything here is __host__ __device__: the kernels decode on the GPU, and the extension's
// debug entry points (bindings.cpp: _owner_samples, _backward_chunks) run the very same code on
// the host so CPU tests can check it against brute force (tests/test_cuda_build.py).
#pragma once

#include <cstdint>

#include "mdm_cuda.h"

#if defined(__CUDACC__)
#define MDM_HD __host__ __device__ __forceinline__
#else
#define MDM_HD inline
#endif

namespace mdm {

// ---------------------------------------------------------------- sample sets
enum SetKind : int {
  kSetJoint = 0,         // n < B: (n, ..., n)
  kSetPerms = 1,         // n < K·B: k = n / B, i = n % B, i_j = perms[k, j, i]
  kSetAll = 2,           // n < B^m: row-major digits, i_1 slowest (negatives.all_grid_indices)
  kSetInfoNceAll = 3,    // n < B·B: anchor i = n / B, candidate c = n % B
  kSetInfoNcePerms = 4,  // n < B·(K+1): anchor i = n / C, c = 0 → i, else perms[c−1, 1, i]
};

struct SampleSet {
  int kind;
  int m;
  bool distinct;         // grid sets: flat ids whose rows are not pairwise distinct are masked
  int64_t B;
  int64_t K;
  int64_t count;         // flat ids enumerated, n ∈ [0, count)
  int64_t samples;       // samples that count: `count` less the masked ids
  int64_t C;             // InfoNCE: candidate slots per anchor (enumerated)
  const int64_t* perms;  // (K, m, B) contiguous, or nullptr
};

MDM_HD bool is_grid(const SampleSet& s) { return s.kind == kSetAll || s.kind == kSetInfoNceAll; }

// Digits of a grid sample (m for "all", 2 — anchor, candidate — for the InfoNCE grid).
MDM_HD int grid_digits(const SampleSet& s) { return s.kind == kSetAll ? s.m : 2; }

MDM_HD int64_t ipow(int64_t b, int e) {
  int64_t r = 1;
  for (int i = 0; i < e; ++i) r *= b;
  return r;
}

// Candidate row of slot c of anchor i (InfoNCE: modalities 2..m take this row together).
MDM_HD int64_t infonce_candidate(const SampleSet& s, int64_t i, int64_t c) {
  if (s.kind == kSetInfoNceAll) return c;
  return c == 0 ? i : s.perms[((c - 1) * s.m + 1) * s.B + i];
}

// Fills idx[0..M) for sample n (M = s.m, a compile-time constant so idx stays in registers);
// returns false for an id masked by `distinct` (some two rows coincide).  For InfoNCE sets
// idx[0] is the anchor.
template <int M>
MDM_HD bool decode_sample(const SampleSet& s, int64_t n, int64_t* idx) {
  switch (s.kind) {
    case kSetJoint:
#pragma unroll
      for (int j = 0; j < M; ++j) idx[j] = n;
      return true;
    case kSetPerms: {
      const int64_t k = n / s.B, i = n - k * s.B;
#pragma unroll
      for (int j = 0; j < M; ++j) idx[j] = s.perms[(k * M + j) * s.B + i];
      return true;
    }
    case kSetAll: {
#pragma unroll
      for (int j = M - 1; j >= 0; --j) {
        const int64_t q = n / s.B;
        idx[j] = n - q * s.B;
        n = q;
      }
      if (!s.distinct) return true;
      bool ok = true;
#pragma unroll
      for (int a = 0; a < M; ++a)
#pragma unroll
        for (int b = a + 1; b < M; ++b) ok = ok && idx[a] != idx[b];
      return ok;
    }
    default: {
      const int64_t i = n / s.C, c = n - i * s.C;
      const int64_t cand = infonce_candidate(s, i, c);
      idx[0] = i;
#pragma unroll
      for (int j = 1; j < M; ++j) idx[j] = cand;
      return !(s.distinct && cand == i);
    }
  }
}

// ---------------------------------------------------------------- owners (backward)
// The backward needs dL/dP_k[r] = Σ_{n : i_k(n) = r} dL/dpre_n.  Instead of every sample
// scattering into m rows with atomics, each output row r of each modality class *owns* the
// list S_k(r) = {n : i_k(n) = r} and sums it in a fixed order (one block per (class, r)):
// deterministic and atomic-free.  Modalities whose rows always coincide share a class (all m
// in the joint set; the candidate modalities 2..m of InfoNCE), so their sum is computed once.
//   joint            1 class {1..m}:      S(r) = {r}
//   perms (K, m, B)  m classes {k}:       S_k(r) from a CSR list (order, offsets) built by
//                                         the caller (stable sort of perms[:, k] by row)
//   "all" grid       m classes {k}:       the ids whose digit k is r (arithmetic)
//   InfoNCE grid     {1}, {2..m}:         anchor r: r·B + c; candidate r: i·B + r
//   InfoNCE perms    {1}, {2..m}:         anchor r: r·C + c; candidate r: CSR list
MDM_HD int owner_class_count(const SampleSet& s) {
  if (s.kind == kSetJoint) return 1;
  if (s.kind == kSetInfoNceAll || s.kind == kSetInfoNcePerms) return 2;
  return s.m;
}

// Modalities of class `cls` as a bit mask (bit k: modality k + 1).
MDM_HD uint32_t owner_members(const SampleSet& s, int cls) {
  const uint32_t all = (1u << s.m) - 1u;
  if (s.kind == kSetJoint) return all;
  if (s.kind == kSetInfoNceAll || s.kind == kSetInfoNcePerms) return cls == 0 ? 1u : all & ~1u;
  return 1u << cls;
}

// A chunk of the backward: lead rows [lead0, lead1) of the slowest grid digit (i_1, or the
// InfoNCE anchor), i.e. flat ids [n0, n1).  Non-grid sets are one chunk.  The per-sample
// dL/dT buffer holds one chunk, so memory stays bounded for any B^m.
struct Chunk {
  int64_t lead0, lead1, n0, n1;
};

// Lead rows per chunk: as many as fit kScoreChunkSamples ids, at least one.
MDM_HD int64_t leads_per_chunk(const SampleSet& s) {
  if (!is_grid(s)) return s.B;
  const int64_t per_lead = s.count / s.B;
  const int64_t leads = kScoreChunkSamples / per_lead;
  return leads < 1 ? 1 : (leads > s.B ? s.B : leads);
}

MDM_HD int64_t num_chunks(const SampleSet& s) {
  const int64_t l = leads_per_chunk(s);
  return (s.B + l - 1) / l;
}

MDM_HD Chunk chunk_at(const SampleSet& s, int64_t c) {
  if (!is_grid(s)) return Chunk{0, s.B, 0, s.count};
  const int64_t per_lead = s.count / s.B, l = leads_per_chunk(s);
  const int64_t lead0 = c * l, lead1 = (lead0 + l < s.B) ? lead0 + l : s.B;
  return Chunk{lead0, lead1, lead0 * per_lead, lead1 * per_lead};
}

// Floats of the dL/dT buffer: the largest chunk.
MDM_HD int64_t chunk_capacity(const SampleSet& s) {
  if (!is_grid(s)) return s.count;
  return leads_per_chunk(s) * (s.count / s.B);
}

// The samples owned by (class, row r) within a chunk, in a fixed order u = 0..count−1.
struct OwnerRange {
  int mode;               // kContiguous: n = base + u; kGridDigit: see owner_sample; kList
  int64_t count;
  int64_t base;           // kContiguous: first id; kGridDigit: lead0 · B^{d−1}
  int64_t low;            // kGridDigit: B^{D−1−d}, the weight of digit d
  int64_t B, r;
  const int64_t* list;    // kList: the owned ids
};
enum OwnerMode : int { kContiguous = 0, kGridDigit = 1, kList = 2 };

// order (slots, list_len) and offsets (slots, B + 1): CSR lists of the perms-based sets (slot
// k = modality k for kSetPerms, slot 0 = the candidates of kSetInfoNcePerms); ids of row r are
// order[slot][offsets[slot][r] .. offsets[slot][r + 1]), ascending.
struct OwnerLists {
  const int64_t* order;
  const int64_t* offsets;
  int64_t list_len;
};

// The CSR list `slot` of row r (see OwnerLists).
MDM_HD OwnerRange owner_list_range(const SampleSet& s, const OwnerLists& lists, int slot,
                                   int64_t r) {
  const int64_t* off = lists.offsets + slot * (s.B + 1);
  return OwnerRange{kList, off[r + 1] - off[r], 0, 1, s.B, r,
                    lists.order + slot * lists.list_len + off[r]};
}

MDM_HD OwnerRange owner_range(const SampleSet& s, const OwnerLists& lists, int cls, int64_t r,
                              const Chunk& ch) {
  switch (s.kind) {
    case kSetJoint:
      return OwnerRange{kContiguous, 1, r, 1, s.B, r, nullptr};
    case kSetPerms:
      return owner_list_range(s, lists, cls, r);
    case kSetInfoNcePerms:
      if (cls == 0) return OwnerRange{kContiguous, s.C, r * s.C, 1, s.B, r, nullptr};
      return owner_list_range(s, lists, 0, r);
    default: {  // grids: digit d of D, chunk over digit 0
      const int D = grid_digits(s);
      const int d = cls;  // "all": class k is digit k; InfoNCE grid: class 1 is the candidate
      if (d == 0) {
        const bool in_chunk = r >= ch.lead0 && r < ch.lead1;
        const int64_t per_lead = ipow(s.B, D - 1);
        return OwnerRange{kContiguous, in_chunk ? per_lead : 0, r * per_lead, 1, s.B, r,
                          nullptr};
      }
      return OwnerRange{kGridDigit, (ch.lead1 - ch.lead0) * ipow(s.B, D - 2),
                        ch.lead0 * ipow(s.B, d - 1), ipow(s.B, D - 1 - d), s.B, r, nullptr};
    }
  }
}

// Flat id of the u-th owned sample.  kGridDigit: u enumerates the other digits in row-major
// order, hi = digits before d (the lead digit offset by lead0), lo = digits after d, and the
// id is (prefix · B + r) · B^{D−1−d} + lo with prefix = hi + lead0 · B^{d−1}.
MDM_HD int64_t owner_sample(const OwnerRange& o, int64_t u) {
  switch (o.mode) {
    case kContiguous: return o.base + u;
    case kGridDigit: {
      const int64_t hi = u / o.low, lo = u - hi * o.low;
      return ((hi + o.base) * o.B + o.r) * o.low + lo;
    }
    default: return o.list[u];
  }
}

}  // namespace mdm
