// Small-head CPU attention: both attention ops of recsys (jagged causal, candidate-prefix), forward and
// backward, fp32, straight on the jagged row layout [rows, H, D] (no padding, no chunk plan); and the rotary
// position embedding that feeds them.
//
// Why by hand: ATen's CPU flash kernels run at 4-24% of the fp32 matmul ceiling at head dim 16
// (docs/performance.md): their per-block GEMMs are tiny and the softmax is not amortised. Here one
// (sequence, head) is a task: its keys are gathered once into a transposed [D, T] buffer; query rows go in
// groups of four whose scores are 64-key blocks of register FMAs sharing every key load; exp is a
// vectorised polynomial; P.V and the backward's rank-four updates read or write each key row once per
// group (D = 16, 32, 48 or 64; any other D is not built and the Python side falls back to ATen). Exact
// softmax per row (no online rescaling): a row's scores fit a buffer of T floats.
//
// Math (natural log, fp32 accumulation), per query row q with visible keys t < lim:
//   s_t = scale * q.k_t;  lse = max s + log sum exp(s - max);  out = sum_t exp(s_t - lse) v_t
//   backward: p_t = exp(s_t - lse), delta = dO.out, ds_t = p_t (dO.v_t - delta),
//             dq = scale sum_t ds_t k_t,  dk_t += scale ds_t q,  dv_t += p_t dO.
//
// Built by kernels/cpu_native.py (g++ -O3 -march=native -fopenmp), called through ctypes with raw
// pointers of contiguous fp32 tensors; OpenMP threads come from torch's own libgomp (same soname).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads / stores

constexpr int W = 16;        // floats per vector
constexpr int KB = 64;       // keys per score block (4 key vectors x R rows of accumulators)
constexpr float NEG = -1.0e30f;  // masked score: exp(NEG - m) == 0, and NEG - x stays finite

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  // (v16{} + x: a scalar add first)
// Horizontal sum / max as balanced trees (depth 4): a left-to-right scalar chain of 15 dependent adds was a
// visible share of the backward on short sequences.
inline float hsum(v16 x) {
  float a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = x[i] + x[i + 8];
  for (int i = 0; i < 4; ++i) b[i] = a[i] + a[i + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline float hmax(v16 x) {
  float a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = x[i] > x[i + 8] ? x[i] : x[i + 8];
  for (int i = 0; i < 4; ++i) b[i] = a[i] > a[i + 4] ? a[i] : a[i + 4];
  const float c = b[0] > b[2] ? b[0] : b[2], d = b[1] > b[3] ? b[1] : b[3];
  return c > d ? c : d;
}

// exp(x) for x <= ~88 (Cephes expf polynomial, ~1 ulp); exactly 0 below -87.3 (and for -inf).
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.3f);
  v16i under = x < lo;
  x = x < lo ? lo : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: round to nearest
  v16 fx = (x * splat(1.44269504088896341f) + magic) - magic;
  x = x - fx * splat(0.693359375f) - fx * splat(-2.12194440e-4f);
  v16 z = x * x;
  v16 y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * z + x + splat(1.0f);
  v16i e = (__builtin_convertvector(fx, v16i) + 127) << 23;
  y = y * (v16)e;  // the exponent bits as a float: 2^fx
  return under ? splat(0.f) : y;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One key set of a (sequence, head) task in task-local buffers: kt [D, ld] (transposed, ld a multiple of the
// vector width W, zero tail) for scores, rows [T, D] for the row updates, vt [D, ld] for the backward's dO.v.
struct Keys {
  int64_t n = 0, ld = 0;
  std::vector<float> kt, k, vt, v;
  // Gather rows [0, n) of head h from a [*, H, D] tensor: element (t, d) at src[(t*H + h)*D + d].
  void gather(const float* ks, const float* vs, int64_t n_, int H, int h, int D, bool backward) {
    n = n_;
    ld = round_up(n > 0 ? n : 1, W);  // dots reads whole vectors only: a candidate's 4 own keys take 16 columns, not 64
    kt.assign(size_t(D) * ld, 0.f);
    if (backward) {
      vt.assign(size_t(D) * ld, 0.f);
      k.resize(size_t(n) * D);
    } else {
      v.resize(size_t(n) * D);
    }
    for (int64_t t = 0; t < n; ++t) {
      const float* kr = ks + (t * H + h) * D;
      const float* vr = vs + (t * H + h) * D;
      for (int d = 0; d < D; ++d) kt[d * ld + t] = kr[d];
      if (backward) {
        for (int d = 0; d < D; ++d) vt[d * ld + t] = vr[d];
        std::memcpy(&k[t * D], kr, sizeof(float) * D);
      } else {
        std::memcpy(&v[t * D], vr, sizeof(float) * D);
      }
    }
  }
};

// A group of up to R query rows of one (sequence, head) is computed together: every key vector loaded for the
// scores and every key row read or updated in the backward serves R rows (instead of being reloaded per row).
constexpr int R = 4;  // rank_r spells out its R = 4 rows

// s[r][t] = x[r] . col_t(mt) for t < round_up(lim, W) (mt [D, ld], ld >= round_up(lim, W)); rows of s are sld
// apart. 64-key blocks (R x 4 accumulators), then 16-key vectors for the tail.
template <int D>
inline void dots(const float (*x)[D], const float* mt, int64_t ld, int64_t lim, float* s, int64_t sld) {
  const int64_t need = round_up(lim, W);
  int64_t t0 = 0;
  for (; t0 + KB <= need; t0 += KB) {
    v16 a[R][4] = {};
    const float* m = mt + t0;
    for (int d = 0; d < D; ++d, m += ld) {
      const v16 k0 = load(m), k1 = load(m + W), k2 = load(m + 2 * W), k3 = load(m + 3 * W);
      for (int r = 0; r < R; ++r) {
        const v16 xd = splat(x[r][d]);
        a[r][0] += xd * k0;
        a[r][1] += xd * k1;
        a[r][2] += xd * k2;
        a[r][3] += xd * k3;
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < 4; ++u) store(s + r * sld + t0 + u * W, a[r][u]);
  }
  for (; t0 < need; t0 += W) {
    v16 a[R] = {};
    const float* m = mt + t0;
    for (int d = 0; d < D; ++d, m += ld) {
      const v16 k0 = load(m);
      for (int r = 0; r < R; ++r) a[r] += splat(x[r][d]) * k0;
    }
    for (int r = 0; r < R; ++r) store(s + r * sld + t0, a[r]);
  }
}

// Row r sees keys t < lims[r]: the rest of its first round_up(lim, W) scores become NEG.
inline void mask(float* s, int64_t sld, const int64_t* lims, int64_t lim) {
  for (int r = 0; r < R; ++r)
    for (int64_t t = lims[r]; t < round_up(lim, W); ++t) s[r * sld + t] = NEG;
}

inline float block_max(const float* s, int64_t lim, float m) {
  v16 mx = splat(m);
  for (int64_t t0 = 0; t0 < lim; t0 += W) {
    v16 x = load(s + t0);
    mx = x > mx ? x : mx;
  }
  return hmax(mx);
}

// s[t] <- exp(s[t] - shift) over whole vectors (masked entries -> 0); returns the lane sums.
inline v16 block_exp(float* s, int64_t lim, float shift) {
  v16 acc{};
  const v16 sh = splat(shift);
  for (int64_t t0 = 0; t0 < lim; t0 += W) {
    v16 e = vexp(load(s + t0) - sh);
    store(s + t0, e);
    acc += e;
  }
  return acc;
}

// acc[r][:] += sum_{t < lim} w[r][t] * rows[t, :] (w rows sld apart): each key row loaded once for all R rows.
template <int D>
inline void weighted_rows(const float* w, int64_t sld, const float* rows, int64_t lim, v16 (*acc)[D / W]) {
  for (int64_t t = 0; t < lim; ++t) {
    for (int j = 0; j < D / W; ++j) {
      const v16 kv = load(rows + t * D + j * W);
      for (int r = 0; r < R; ++r) acc[r][j] += splat(w[r * sld + t]) * kv;
    }
  }
}

// rows[t, :] += sum_r w[r][t] * x[r] for t < lim: each key row read and written once for all R rows.
template <int D>
inline void rank_r(const float* w, int64_t sld, const float (*x)[D], int64_t lim, float* rows) {
  constexpr int DV = D / W;
  v16 xv[R][DV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < DV; ++j) xv[r][j] = load(x[r] + j * W);
  for (int64_t t = 0; t < lim; ++t) {
    const v16 w0 = splat(w[t]), w1 = splat(w[sld + t]), w2 = splat(w[2 * sld + t]), w3 = splat(w[3 * sld + t]);
    for (int j = 0; j < DV; ++j) {  // a tree, not a chain of R dependent FMAs per key
      const v16 a = (w0 * xv[0][j] + w1 * xv[1][j]) + (w2 * xv[2][j] + w3 * xv[3][j]);
      store(rows + t * D + j * W, load(rows + t * D + j * W) + a);
    }
  }
}

// Up to R query rows of one (sequence, head) against key sets ks[0..n_sets): row r sees keys t < lims[i][r] of
// set i. Padding rows (r >= n) have lims 0 and zero inputs and are not written.
template <int D>
struct Group {
  int n = 0;
  float xs[R][D];      // scale * q
  int64_t lims[2][R];  // per key set, per row
  int64_t lim[2];      // per key set: max over rows

  // Row copies as whole vectors: a per-element form (r < n ? q[r][d] : 0) compiled to gathers, which were most
  // of the backward's time on short sequences.
  static void copy_rows(float (*dst)[D], const float* const* src, int n, float scale) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < D / W; ++j) store(dst[r] + j * W, r < n ? load(src[r] + j * W) * scale : v16{});
  }
  void load_queries(const float* const* q, int n_rows, float scale) {
    n = n_rows;
    copy_rows(xs, q, n, scale);
  }
  void set_lims(int i, const int64_t* row_lims) {
    lim[i] = 0;
    for (int r = 0; r < R; ++r) {
      lims[i][r] = r < n ? row_lims[r] : 0;
      lim[i] = lims[i][r] > lim[i] ? lims[i][r] : lim[i];
    }
  }

  // out[r] (D floats) and lse[r] for the real rows; s: R rows of sld >= sum of the sets' ld.
  void forward(const Keys* const* ks, int n_sets, float* s, int64_t sld, float* const* out, float* const* lse) {
    int64_t off[2];
    float m[R], l[R] = {};
    for (int r = 0; r < R; ++r) m[r] = NEG;
    for (int i = 0, o = 0; i < n_sets; o += int(ks[i]->ld), ++i) {
      off[i] = o;
      dots<D>(xs, ks[i]->kt.data(), ks[i]->ld, lim[i], s + o, sld);
      mask(s + o, sld, lims[i], lim[i]);
      for (int r = 0; r < R; ++r) m[r] = block_max(s + r * sld + o, lim[i], m[r]);
    }
    v16 acc[R][D / W] = {};
    for (int i = 0; i < n_sets; ++i) {
      for (int r = 0; r < R; ++r) l[r] += hsum(block_exp(s + r * sld + off[i], lim[i], m[r]));
      weighted_rows<D>(s + off[i], sld, ks[i]->v.data(), lim[i], acc);
    }
    for (int r = 0; r < n; ++r) {
      const float inv = 1.f / l[r];
      for (int j = 0; j < D / W; ++j) store(out[r] + j * W, acc[r][j] * inv);
      *lse[r] = m[r] + std::log(l[r]);
    }
  }

  // dq[r] written; dk / dv rows of every key set accumulated. s, dp: R rows of sld >= every set's ld.
  void backward(const float* const* dout, const float* const* out, const float* lse, const Keys* const* ks,
                int n_sets, float* s, float* dp, int64_t sld, float* const* dk, float* const* dv, float* const* dq,
                float scale) {
    float dos[R][D], delta[R];
    copy_rows(dos, dout, n, 1.f);
    for (int r = 0; r < R; ++r) {
      v16 acc{};
      for (int j = 0; r < n && j < D / W; ++j) acc += load(dos[r] + j * W) * load(out[r] + j * W);
      delta[r] = hsum(acc);
    }
    v16 acc[R][D / W] = {};
    for (int i = 0; i < n_sets; ++i) {
      const Keys& kk = *ks[i];
      const int64_t lm = lim[i];
      dots<D>(xs, kk.kt.data(), kk.ld, lm, s, sld);
      mask(s, sld, lims[i], lm);
      for (int r = 0; r < R; ++r) block_exp(s + r * sld, lm, r < n ? lse[r] : 0.f);  // s <- p (0 where masked)
      dots<D>(dos, kk.vt.data(), kk.ld, lm, dp, sld);
      for (int r = 0; r < R; ++r)
        for (int64_t t0 = 0; t0 < lm; t0 += W)
          store(dp + r * sld + t0, load(s + r * sld + t0) * (load(dp + r * sld + t0) - splat(delta[r])));  // ds
      weighted_rows<D>(dp, sld, kk.k.data(), lm, acc);
      rank_r<D>(dp, sld, xs, lm, dk[i]);
      rank_r<D>(s, sld, dos, lm, dv[i]);
    }
    for (int r = 0; r < n; ++r)
      for (int j = 0; j < D / W; ++j) store(dq[r] + j * W, acc[r][j] * scale);
  }
};

// ------------------------------------------------------------------------------------------------
// Jagged causal attention: sequence i has n_k keys and its last n_q positions query (n_q <= n_k);
// query j sits at position n_k - n_q + j and sees keys 0 .. that position.
// ------------------------------------------------------------------------------------------------
constexpr int64_t QBLOCK = 512;  // query rows per forward task

template <int D>
void jagged_fwd(const float* q, const float* k, const float* v, const int64_t* kv, const int64_t* qo, int64_t n_seq,
                int H, float scale, float* out, float* lse, int threads) {
  std::vector<int64_t> task_seq, task_row;
  for (int64_t i = 0; i < n_seq; ++i)
    for (int64_t j = 0; j < qo[i + 1] - qo[i]; j += QBLOCK) task_seq.push_back(i), task_row.push_back(j);
  const int64_t n_tasks = int64_t(task_seq.size()) * H;
  const int64_t rows = qo[n_seq];
#pragma omp parallel num_threads(threads)
  {
    Keys keys;
    Group<D> g;
    std::vector<float> s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t i = task_seq[task / H], j0 = task_row[task / H];
      const int h = int(task % H);
      const int64_t n_k = kv[i + 1] - kv[i], n_q = qo[i + 1] - qo[i];
      const int64_t j1 = j0 + QBLOCK < n_q ? j0 + QBLOCK : n_q;
      const int64_t first = n_k - n_q;
      keys.gather(k + kv[i] * H * D, v + kv[i] * H * D, first + j1, H, h, D, false);
      s.resize(size_t(R * keys.ld));
      const Keys* ks[1] = {&keys};
      for (int64_t j = j0; j < j1; j += R) {
        const int n = int(j1 - j < R ? j1 - j : R);
        const float* qr[R];
        float* orow[R];
        float* lrow[R];
        int64_t lims[R];
        for (int r = 0; r < n; ++r) {
          const int64_t row = qo[i] + j + r;
          qr[r] = q + (row * H + h) * D;
          orow[r] = out + (row * H + h) * D;
          lrow[r] = lse + h * rows + row;
          lims[r] = first + j + r + 1;
        }
        g.load_queries(qr, n, scale);
        g.set_lims(0, lims);
        g.forward(ks, 1, s.data(), keys.ld, orow, lrow);
      }
    }
  }
}

template <int D>
void jagged_bwd(const float* dout, const float* q, const float* k, const float* v, const float* out,
                const float* lse, const int64_t* kv, const int64_t* qo, int64_t n_seq, int H, float scale, float* dq,
                float* dk, float* dv, int threads) {
  const int64_t rows = qo[n_seq];
#pragma omp parallel num_threads(threads)
  {
    Keys keys;
    Group<D> g;
    std::vector<float> s, dp, gk, gv;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_seq * H; ++task) {
      const int64_t i = task / H;
      const int h = int(task % H);
      const int64_t n_k = kv[i + 1] - kv[i], n_q = qo[i + 1] - qo[i], first = n_k - n_q;
      keys.gather(k + kv[i] * H * D, v + kv[i] * H * D, n_k, H, h, D, true);
      s.resize(size_t(R * keys.ld));
      dp.resize(size_t(R * keys.ld));
      gk.assign(size_t(n_k) * D, 0.f);
      gv.assign(size_t(n_k) * D, 0.f);
      const Keys* ks[1] = {&keys};
      float* gks[1] = {gk.data()};
      float* gvs[1] = {gv.data()};
      for (int64_t j = 0; j < n_q; j += R) {
        const int n = int(n_q - j < R ? n_q - j : R);
        const float *qr[R], *dor[R], *orow[R];
        float* dqr[R];
        float lr[R];
        int64_t lims[R];
        for (int r = 0; r < n; ++r) {
          const int64_t row = qo[i] + j + r, at = (row * H + h) * D;
          qr[r] = q + at, dor[r] = dout + at, orow[r] = out + at, dqr[r] = dq + at;
          lr[r] = lse[h * rows + row];
          lims[r] = first + j + r + 1;
        }
        g.load_queries(qr, n, scale);
        g.set_lims(0, lims);
        g.backward(dor, orow, lr, ks, 1, s.data(), dp.data(), keys.ld, gks, gvs, dqr, scale);
      }
      for (int64_t t = 0; t < n_k; ++t) {
        std::memcpy(dk + ((kv[i] + t) * H + h) * D, &gk[t * D], sizeof(float) * D);
        std::memcpy(dv + ((kv[i] + t) * H + h) * D, &gv[t * D], sizeof(float) * D);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Candidate-prefix attention: candidate c of request b has N own tokens (rows c*N .. c*N+N-1 of q, k, v);
// own token n sees request b's whole prefix (prefix rows po[b] .. po[b+1]-1) and own tokens 0 .. n.
// A group is up to R own tokens of one candidate. An empty prefix: the own set alone.
// ------------------------------------------------------------------------------------------------
constexpr int64_t CBLOCK = 16;  // candidates per forward task

// Rows n0 .. n0+n-1 of candidate c: lims per key set ({prefix, own} or {own}) into the group.
template <int D>
inline void prefix_group_lims(Group<D>& g, int64_t n_p, int n0, int n) {
  int64_t lp[R], lo[R];
  for (int r = 0; r < n; ++r) lp[r] = n_p, lo[r] = n0 + r + 1;
  if (n_p > 0) {
    g.set_lims(0, lp);
    g.set_lims(1, lo);
  } else {
    g.set_lims(0, lo);
  }
}

template <int D>
void prefix_fwd(const float* q, const float* k, const float* v, const float* pk, const float* pv, const int64_t* po,
                const int64_t* co, int64_t n_req, int N, int H, float scale, float* out, float* lse, int threads) {
  std::vector<int64_t> task_req, task_c0;
  for (int64_t b = 0; b < n_req; ++b)
    for (int64_t c = co[b]; c < co[b + 1]; c += CBLOCK) task_req.push_back(b), task_c0.push_back(c);
  const int64_t n_tasks = int64_t(task_req.size()) * H;
  const int64_t rows = co[n_req] * N;
#pragma omp parallel num_threads(threads)
  {
    Keys prefix, own;
    Group<D> g;
    std::vector<float> s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t b = task_req[task / H], c0 = task_c0[task / H], n_p = po[b + 1] - po[b];
      const int h = int(task % H);
      const int64_t c1 = c0 + CBLOCK < co[b + 1] ? c0 + CBLOCK : co[b + 1];
      prefix.gather(pk + po[b] * H * D, pv + po[b] * H * D, n_p, H, h, D, false);
      const Keys* ks[2] = {&prefix, &own};
      const int first = n_p > 0 ? 0 : 1;
      for (int64_t c = c0; c < c1; ++c) {
        own.gather(k + c * N * H * D, v + c * N * H * D, N, H, h, D, false);
        const int64_t sld = prefix.ld + own.ld;
        s.resize(size_t(R * sld));
        for (int n0 = 0; n0 < N; n0 += R) {
          const int n = N - n0 < R ? N - n0 : R;
          const float* qr[R];
          float* orow[R];
          float* lrow[R];
          for (int r = 0; r < n; ++r) {
            const int64_t row = c * N + n0 + r;
            qr[r] = q + (row * H + h) * D, orow[r] = out + (row * H + h) * D, lrow[r] = lse + h * rows + row;
          }
          g.load_queries(qr, n, scale);
          prefix_group_lims(g, n_p, n0, n);
          g.forward(ks + first, 2 - first, s.data(), sld, orow, lrow);
        }
      }
    }
  }
}

template <int D>
void prefix_bwd(const float* dout, const float* q, const float* k, const float* v, const float* pk, const float* pv,
                const float* out, const float* lse, const int64_t* po, const int64_t* co, int64_t n_req, int N, int H,
                float scale, float* dq, float* dk, float* dv, float* dpk, float* dpv, int threads) {
  const int64_t rows = co[n_req] * N;
#pragma omp parallel num_threads(threads)
  {
    Keys prefix, own;
    Group<D> g;
    std::vector<float> s, dp, gpk, gpv, gk, gv;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_req * H; ++task) {
      const int64_t b = task / H, n_p = po[b + 1] - po[b];
      const int h = int(task % H);
      prefix.gather(pk + po[b] * H * D, pv + po[b] * H * D, n_p, H, h, D, true);
      gpk.assign(size_t(n_p) * D, 0.f);
      gpv.assign(size_t(n_p) * D, 0.f);
      const Keys* ks[2] = {&prefix, &own};
      const int first = n_p > 0 ? 0 : 1;
      for (int64_t c = co[b]; c < co[b + 1]; ++c) {
        own.gather(k + c * N * H * D, v + c * N * H * D, N, H, h, D, true);
        const int64_t sld = prefix.ld > own.ld ? prefix.ld : own.ld;
        s.resize(size_t(R * sld));
        dp.resize(s.size());
        gk.assign(size_t(N) * D, 0.f);
        gv.assign(size_t(N) * D, 0.f);
        float* gks[2] = {gpk.data(), gk.data()};
        float* gvs[2] = {gpv.data(), gv.data()};
        for (int n0 = 0; n0 < N; n0 += R) {
          const int n = N - n0 < R ? N - n0 : R;
          const float *qr[R], *dor[R], *orow[R];
          float* dqr[R];
          float lr[R];
          for (int r = 0; r < n; ++r) {
            const int64_t row = c * N + n0 + r, at = (row * H + h) * D;
            qr[r] = q + at, dor[r] = dout + at, orow[r] = out + at, dqr[r] = dq + at;
            lr[r] = lse[h * rows + row];
          }
          g.load_queries(qr, n, scale);
          prefix_group_lims(g, n_p, n0, n);
          g.backward(dor, orow, lr, ks + first, 2 - first, s.data(), dp.data(), sld, gks + first, gvs + first, dqr,
                     scale);
        }
        for (int n = 0; n < N; ++n) {
          std::memcpy(dk + ((c * N + n) * H + h) * D, &gk[n * D], sizeof(float) * D);
          std::memcpy(dv + ((c * N + n) * H + h) * D, &gv[n * D], sizeof(float) * D);
        }
      }
      for (int64_t t = 0; t < n_p; ++t) {
        std::memcpy(dpk + ((po[b] + t) * H + h) * D, &gpk[t * D], sizeof(float) * D);
        std::memcpy(dpv + ((po[b] + t) * H + h) * D, &gpv[t * D], sizeof(float) * D);
      }
    }
  }
}

}  // namespace

// C entry points (ctypes). Each returns 0, or -1 when D is not a built head size.
#define DISPATCH(D_, CALL) \
  switch (D_) {            \
    case 16: CALL(16); break; \
    case 32: CALL(32); break; \
    case 48: CALL(48); break; \
    case 64: CALL(64); break; \
    default: return -1;    \
  }                        \
  return 0;

extern "C" {

int recsys_jagged_fwd(const float* q, const float* k, const float* v, const int64_t* kv, const int64_t* qo,
                      int64_t n_seq, int H, int D, float scale, float* out, float* lse, int threads) {
#define CALL(X) jagged_fwd<X>(q, k, v, kv, qo, n_seq, H, scale, out, lse, threads)
  DISPATCH(D, CALL)
#undef CALL
}

int recsys_jagged_bwd(const float* dout, const float* q, const float* k, const float* v, const float* out,
                      const float* lse, const int64_t* kv, const int64_t* qo, int64_t n_seq, int H, int D, float scale,
                      float* dq, float* dk, float* dv, int threads) {
#define CALL(X) jagged_bwd<X>(dout, q, k, v, out, lse, kv, qo, n_seq, H, scale, dq, dk, dv, threads)
  DISPATCH(D, CALL)
#undef CALL
}

int recsys_prefix_fwd(const float* q, const float* k, const float* v, const float* pk, const float* pv,
                      const int64_t* po, const int64_t* co, int64_t n_req, int N, int H, int D, float scale, float* out,
                      float* lse, int threads) {
#define CALL(X) prefix_fwd<X>(q, k, v, pk, pv, po, co, n_req, N, H, scale, out, lse, threads)
  DISPATCH(D, CALL)
#undef CALL
}

int recsys_prefix_bwd(const float* dout, const float* q, const float* k, const float* v, const float* pk,
                      const float* pv, const float* out, const float* lse, const int64_t* po, const int64_t* co,
                      int64_t n_req, int N, int H, int D, float scale, float* dq, float* dk, float* dv, float* dpk,
                      float* dpv, int threads) {
#define CALL(X) prefix_bwd<X>(dout, q, k, v, pk, pv, out, lse, po, co, n_req, N, H, scale, dq, dk, dv, dpk, dpv, threads)
  DISPATCH(D, CALL)
#undef CALL
}

// Rotary position embedding (rotate-half form) of P parts of H heads of D floats, the first n_rot rotated
// by the angles (cos, sin [M, D/2]) times `sign` (+1 forward, -1 its backward), the others copied.
// Element (m, p, h, d) is read at src[p] + m*src_row + h*D + d (src[p] null: zeros) and written at
// dst[p] + m*dst_row + h*D + d: one pass instead of ATen's four strided half-row passes per part.
int recsys_rotary(const float* const* src, int64_t src_row, float* const* dst, int64_t dst_row, const float* cos,
                  const float* sin, int64_t M, int P, int H, int D, int n_rot, float sign, int threads) {
  if (D % 2 != 0) return -1;
  const int half = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const float* c = cos + m * half;
    const float* sn = sin + m * half;
    for (int p = 0; p < P; ++p) {
      float* o = dst[p] + m * dst_row;
      if (src[p] == nullptr) {
        std::memset(o, 0, sizeof(float) * H * D);
        continue;
      }
      const float* x = src[p] + m * src_row;
      if (p >= n_rot) {
        std::memcpy(o, x, sizeof(float) * H * D);
        continue;
      }
      for (int h = 0; h < H; ++h) {
        const float* x1 = x + h * D;
        float* o1 = o + h * D;
        for (int j = 0; j < half; ++j) {
          const float s = sign * sn[j];
          o1[j] = x1[j] * c[j] - x1[j + half] * s;
          o1[j + half] = x1[j + half] * c[j] + x1[j] * s;
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
