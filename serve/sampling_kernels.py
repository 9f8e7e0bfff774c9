"""Per-row sampling kernels: numba, compiled once and cached on disk, run without the GIL.

A row's work is a handful of passes over its V logits, never a sort of the vocabulary, and each
row is taken from its logits to its token in one go, so its weights stay in the core's cache.

* The weights are exp((logits - row max) / T), largest exactly 1: the max comes from an integer
  pass over the float bits (which also finds a NaN or +inf, a row without a distribution), the
  exp from a polynomial that LLVM vectorises (numba's own exp calls libm once per value).
* The kept set (after top_k, top_p, min_p) is always a prefix of the tokens ordered by
  (probability descending, token id ascending). It is written `(vc, ties)`: every token with
  p > vc, plus the `ties` lowest-id tokens with p == vc (`ties` < 0: all of them).
* Its boundary is found by *weighted selection*: SPLITS geometric thresholds split the values in
  play into bands, one pass counts the tokens and sums the mass above each threshold, the band
  holding the boundary is gathered, and the loop repeats on it; only a band of at most SORT_BAND
  values (or of equal values) is sorted. A trained model's nucleus boundary takes one pass over
  the vocabulary and a few over a shrinking band (llama.cpp's bucket samplers do the same in C;
  vLLM's top-k window needs a full sort when the nucleus spills out of it, this never does).
* Most rows are searched in a window, not whole: one pass counts and sums the tokens within a
  factor 4^5 (or else 4^7) of the most likely one; when those hold the boundary (the k-th value, or
  top_p of the whole row's mass), a masked compress-store gathers them, a few hundred values for a
  trained word model, and the selection runs on them alone. Otherwise it runs on the whole row.
* The draw is an inverse CDF over the kept tokens in token-id order: masked sums of blocks of
  BLOCK tokens find the crossing block, then one block is scanned.

serve/sampling.py states the semantics; tests/test_sampling_exact.py holds a float64 full-sort
reference that these must match.
"""
from __future__ import annotations

import os
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
if "NUMBA_CACHE_DIR" not in os.environ and not os.access(os.path.join(_HERE, "__pycache__"), os.W_OK) \
        and not os.access(_HERE, os.W_OK):
    # A read-only install (a container's site-packages): numba cannot cache beside the module and,
    # without a writable home, refuses to start ("no locator available"). Cache in a temp folder.
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"lstmgen-numba-{os.getuid()}")

import numba as nb  # noqa: E402 (after the cache folder is settled)
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

if os.environ.get("NUMBA_CACHE_DIR"):
    nb.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # numba may have been imported before this module
if not os.environ.get("NUMBA_THREADING_LAYER"):
    # numba's parallel kernels run on OpenMP where libgomp is present, and GNU OpenMP's threads
    # spin for milliseconds after a parallel region by default: the model step right after the
    # sampler ran 60% slower (11.4 -> 18.5 ms, ptb-medium at batch 64 on 2 cores). PASSIVE puts
    # them to sleep at once (libgomp reads it when numba first loads it). numba's workqueue layer
    # sleeps too, but waking it cost more than it saved: batch 64 x 10,000, top_p, 1.24 ms shared
    # vs 0.99 ms serial; OpenMP passive 0.73 ms (docs/benchmark.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BLOCK = 256  # tokens per block summed ahead of the inverse-CDF scan
SPLITS = 8  # thresholds per selection round
SORT_BAND = 64  # a band this small is sorted outright
SMALL_VOCAB = 256  # rows this short (char models) are sorted outright: selection's fixed cost is more
# ... unless top_p alone cuts and its nucleus holds at most this many distinct values: they are then
# picked largest first, a pass over the row each (a trained char model's nucleus at top_p 0.9
# holds a handful of characters; sorting 83 values cost 4x the pass-per-value walk, docs/benchmark.md)
NUCLEUS_PICKS = 8

_jit = dict(cache=True, nogil=True)


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 `bits` (a free bitcast; numba has no scalar view)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _compress16(typingctx, src, i, dst, j, lo, hi):
    """Of the 16 floats src[i:i+16], those with lo <= x < hi go to dst[j:], in order; returns how
    many. LLVM's masked compress-store: one instruction with AVX-512 (vcompressps), a sequence of
    conditional stores without it; a loop with a branch per value is 4x slower."""
    if not (isinstance(src, types.Array) and src.layout == "C" and src.dtype == types.float32
            and isinstance(dst, types.Array) and dst.layout == "C" and dst.dtype == types.float32):
        raise nb.errors.TypingError("_compress16 takes contiguous float32 arrays")  # a strided row would be misread
    sig = types.int64(src, types.int64, dst, types.int64, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        src_arr = context.make_array(signature.args[0])(context, builder, args[0])
        dst_arr = context.make_array(signature.args[2])(context, builder, args[2])
        v16 = ir.VectorType(ir.FloatType(), 16)
        m16 = ir.VectorType(ir.IntType(1), 16)
        val = builder.load(builder.bitcast(builder.gep(src_arr.data, [args[1]]), v16.as_pointer()), align=4)

        def splat(x):
            one = builder.insert_element(ir.Constant(v16, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(v16, ir.Undefined),
                                          ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
        mask = builder.and_(builder.fcmp_ordered(">=", val, splat(args[4])),
                            builder.fcmp_ordered("<", val, splat(args[5])))
        out = builder.gep(dst_arr.data, [args[3]])
        name = "llvm.masked.compressstore.v16f32"
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [v16, out.type, m16]), name=name)
        builder.call(fn, [val, out, mask])
        return builder.zext(builder.ctpop(builder.bitcast(mask, ir.IntType(16))), ir.IntType(64))
    return sig, codegen


_SIGN_OFF = np.int32(0x7FFFFFFF)
KEY_NEG_INF = np.int32(-2139095041)  # _key(-inf): every other float's key is larger, a NaN's aside
KEY_POS_INF = np.int32(0x7F800000)  # _key(+inf); a positive NaN's key is larger


@nb.njit(inline="always")
def _key(b):
    """int32 bits of a float32 -> an int32 in the floats' order (its own inverse); NaNs land past
    the ends: a positive NaN above +inf, a negative one below -inf."""
    return b ^ ((b >> 31) & _SIGN_OFF)


@nb.njit(**_jit)
def row_max(bits):
    """A row's largest value from its float32 bits (int32 [V]), and whether the row has a
    distribution: no NaN, no +inf, not all -inf. Integer min/max vectorise; float max does not
    (LLVM keeps NaN order), 10x slower."""
    hi, lo = np.int32(-2147483648), np.int32(2147483647)
    for i in range(bits.shape[0]):
        k = _key(bits[i])
        hi = max(hi, k)
        lo = min(lo, k)
    return _f32_from_bits(_key(hi)), lo >= KEY_NEG_INF and KEY_NEG_INF < hi < KEY_POS_INF


# e^r for |r| <= ln(2)/2: Taylor to degree 7 (relative error < 1e-8, below float32's 6e-8).
# ln 2 in two parts (Cody and Waite) so that y - n ln 2 is exact to float32 for |n| <= 160.
_E2, _E3, _E4, _E5, _E6, _E7 = (np.float32(1 / np.prod(np.arange(1, k + 1))) for k in range(2, 8))
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # 8 significant bits: n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)


@nb.njit(inline="always")
def _weight(x, m, inv_t):
    """exp((x - m) * inv_t) for x <= m; 0 below e^-110 (2^-159). IEEE arithmetic with one
    licence, fused multiply-adds (weights_row's fastmath "contract": 27% faster on AVX2, 64 new
    rows of 10,000), and no reassociation: the vector body and the scalar tail of a row give the
    same bits (a test moves values around a row), so a row's weights never depend on where it
    sits in its batch. Within 2 ulp of exp of the float32 argument (tests/test_sampling_exact.py)."""
    y = (x - m) * inv_t
    y = y if y > np.float32(-110.0) else np.float32(-110.0)  # -inf (impossible tokens) too
    n = -np.int32(np.float32(0.5) - y * _LOG2E)  # round(y / ln 2): y <= 0, the cast truncates
    fn = np.float32(n)
    r = (y - fn * _LN2_HI) - fn * _LN2_LO
    p = np.float32(1.0) + r * (np.float32(1.0) + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * _E7))))))
    # 2^n as two normal floats (n >= -160 is below float32's normal range): the product rounds
    # to the subnormal it should be
    n1 = n >> 1
    return p * _f32_from_bits((n1 + 127) << 23) * _f32_from_bits((n - n1 + 127) << 23)


@nb.njit(fastmath={"contract"}, **_jit)
def weights_row(x, inv_t, w):
    """w float32 [V] = exp((x - max x) * inv_t), largest exactly 1; False (w untouched) for a row
    without a distribution (see row_max)."""
    m, ok = row_max(x.view(np.int32))
    if not ok:
        return False
    t = np.float32(inv_t)
    for i in range(x.shape[0]):
        w[i] = _weight(x[i], m, t)
    return True


# Round one's thresholds, relative to the row's largest probability (1 by construction): bands of
# a factor 4 cover seven octave pairs, and the last threshold (the smallest positive float32)
# takes everything else, so its count and mass are the row's positive tokens and total mass.
TINY = np.float32(1e-45)
FIRST = np.array([4.0 ** -(j + 1) for j in range(SPLITS - 1)] + [1e-45], np.float32)
# The windows (see _cut): the tokens within a factor 4^5 (4^7) of the most likely one. On a PTB
# model trained for two epochs (validation perplexity 147), temperature 0.8, over 3,840 rows of
# the validation text: a median of 126 (942) tokens, holding a 0.9 nucleus in 68% (100%) of the
# rows and the top 40 in 89% (98%). On the benchmark's shaped random logits the first holds both
# in every row.
WINDOW = np.float32(4.0 ** -5)
WIDE_WINDOW = np.float32(4.0 ** -7)




@nb.njit(fastmath=True, **_jit)
def _count_mass(vals, t):
    """How many vals are >= t, and their sum. Inner
    loops of a fixed BLOCK trips with a select are what LLVM vectorises (variable bounds or one
    running sum over the row it does not: 5-10x slower); float32 within a block, float64 across
    (a nucleus edge deep in a 33k-word tail is a difference of 1e-7)."""
    whole = vals.shape[0] // BLOCK
    z = np.float32(0.0)
    count = 0
    mass = 0.0
    for b in range(whole):
        base = b * BLOCK
        m = z
        c = z
        for i in range(BLOCK):
            x = vals[base + i]
            k = np.float32(x >= t)
            m += x * k
            c += k
        mass += m
        count += int(c)
    # the tail, and all of a band under BLOCK values: branch-free, since values in token order
    # cross t at random and a branch on them mispredicts (serial top_p, 64 new rows: -19%)
    for i in range(whole * BLOCK, vals.shape[0]):
        x = vals[i]
        k = x >= t
        count += k
        mass += x * k
    return count, mass


@nb.njit(**_jit)
def _above(vals, th):
    """Count and mass of vals >= th[j] for each of the SPLITS thresholds. Masses
    are float32 within a chunk and float64 across chunks: a nucleus edge deep in a 33k-word tail
    is a difference of 1e-7."""
    cnt = np.zeros(SPLITS, np.int64)
    mass = np.zeros(SPLITS, np.float64)
    for j in range(SPLITS):
        cnt[j], mass[j] = _count_mass(vals, th[j])
    return cnt, mass


@nb.njit(**_jit)
def _band(vals, lo, hi):
    """The values in [lo, hi), in order (one pass into a buffer as long as vals)."""
    return _compress(vals, lo, hi, vals.shape[0])


@nb.njit(**_jit)
def _compress(vals, lo, hi, n):
    """The values in [lo, hi), in order; there must be at most n of them."""
    out = np.empty(n + 16, np.float32)  # room for one block's worth past n (never used when n is right)
    j = 0
    whole = vals.shape[0] // 16
    for b in range(whole):
        if j > n:
            break
        j += _compress16(vals, b * 16, out, j, lo, hi)
    for i in range(whole * 16, vals.shape[0]):  # branch-free: write always, keep when in range
        out[j] = vals[i]  # j < n + 16: inside the buffer
        j += (lo <= vals[i]) & (vals[i] < hi) & (j < n)
    return out[:min(j, n)]


@nb.njit(**_jit)
def _select(vals, th, cnt, mass, floor, by_mass, target):
    """Walk the values >= floor (> 0) in descending order, accumulating a count (or their mass,
    by_mass) until it reaches target; return that value v and the count and mass of the values
    > v and of the values >= v. th, cnt, mass: the first round (_above(vals, th)); th[-1] must be
    <= floor. If the walk never reaches target (float rounding of a mass target), v is the
    smallest value in play."""
    hi = np.float32(np.inf)  # the boundary is < hi; everything >= hi is in the prefix
    c_hi, m_hi = 0, 0.0
    first_round = True  # th, cnt, mass come from the caller; later rounds split the band
    while True:
        n = vals.shape[0]
        if not first_round:
            if n <= SORT_BAND:
                break
            vmax, vmin = np.float32(0.0), np.float32(np.inf)
            for i in range(n):
                x = vals[i]
                vmax = x if x > vmax else vmax
                vmin = x if x < vmin else vmin
            if vmax <= vmin:
                break
            th = np.empty(SPLITS, np.float32)  # geometric between the band's ends, th[-1] == vmin
            ratio = (np.float64(vmin) / np.float64(vmax)) ** (1.0 / SPLITS)
            for j in range(SPLITS - 1):
                th[j] = np.float32(vmax * ratio ** (j + 1))
            th[SPLITS - 1] = vmin
            cnt, mass = _above(vals, th)
        j = 0
        while j < SPLITS - 1 and (m_hi + mass[j] if by_mass else c_hi + cnt[j]) < target:
            j += 1
        lo = max(th[j], floor)
        if j > 0:
            c_hi += cnt[j - 1]
            m_hi += mass[j - 1]
            hi = th[j - 1]
        band = _band(vals, lo, hi)
        stuck = band.shape[0] >= n and not first_round  # no progress (equal values): sort the rest
        vals, first_round = band, False
        if stuck:
            break
    s = np.sort(vals)[::-1]  # the last band, descending
    c, m = c_hi, m_hi
    i = 0
    while i < s.shape[0] - 1 and (m + s[i] if by_mass else c + 1) < target:
        c += 1
        m += s[i]
        i += 1
    if s.shape[0] == 0:
        return floor, c, m, c, m
    x = s[i]
    lo = i  # the run of values equal to x is s[lo:up]
    while lo > 0 and s[lo - 1] == x:
        lo -= 1
    up = i + 1
    while up < s.shape[0] and s[up] == x:
        up += 1
    c_gt, m_gt = c - (i - lo), m - np.float64(x) * (i - lo)
    return x, c_gt, m_gt, c_gt + (up - lo), m_gt + np.float64(x) * (up - lo)


@nb.njit(fastmath=True, **_jit)
def _window_mass(p, t1, t2):
    """_count_mass for three thresholds in one pass instead of three: the count and mass of
    p >= t1, of p >= t2, and of p > 0 (the row's positive tokens and its total mass)."""
    whole = p.shape[0] // BLOCK
    z = np.float32(0.0)
    c1, m1, c2, m2, c_pos, m_pos = 0, 0.0, 0, 0.0, 0, 0.0
    for b in range(whole):
        base = b * BLOCK
        s1, n1, s2, n2, sp, np_ = z, z, z, z, z, z
        for i in range(BLOCK):
            x = p[base + i]
            k1 = np.float32(x >= t1)
            k2 = np.float32(x >= t2)
            q = np.float32(x >= TINY)
            s1 += x * k1
            n1 += k1
            s2 += x * k2
            n2 += k2
            sp += x * q
            np_ += q
        m1 += s1
        c1 += int(n1)
        m2 += s2
        c2 += int(n2)
        m_pos += sp
        c_pos += int(np_)
    for i in range(whole * BLOCK, p.shape[0]):
        x = p[i]
        k1, k2, q = x >= t1, x >= t2, x >= TINY
        c1 += k1
        m1 += x * k1
        c2 += k2
        m2 += x * k2
        c_pos += q
        m_pos += x * q
    return c1, m1, c2, m2, c_pos, m_pos


@nb.njit(inline="always")
def _then_min_p(vc, ties, min_p):
    """The kept set (vc, ties) after min_p, which runs last: p >= min_p (x the largest
    probability, 1) when that keeps fewer tokens, a subset of what top_k and top_p kept."""
    if min_p > 0.0 and np.float32(min_p) > vc:
        return np.float32(min_p), -1
    return vc, ties


@nb.njit(**_jit)
def _cut(p, k, top_p, min_p):
    """The kept set (vc, ties) after top_k, then top_p, then min_p (Hugging Face's order).
    p's largest value must be 1 (weights_row). When the tokens with p >= WINDOW (or else
    WIDE_WINDOW) hold the k-th value (top_k) or top_p of the mass, only they are searched (a
    trained model's rows: one pass over the vocabulary, then a few hundred values); otherwise the
    whole row is."""
    if k <= 0 and top_p >= 1.0:  # min_p alone: a threshold, nothing to select
        return _then_min_p(np.float32(0.0), -1, min_p)  # everything, then min_p
    if p.shape[0] <= SMALL_VOCAB:
        if (k <= 0 or k >= p.shape[0]) and top_p < 1.0:  # top_p (and min_p) alone
            vc, ties, done = _cut_picked(p, top_p, min_p)
            if done:
                return vc, ties
        return _cut_sorted(p, k, top_p, min_p)
    c1, m1, c2, m2, positive, total = _window_mass(p, WINDOW, WIDE_WINDOW)
    k_on = 0 < k < positive
    if not k_on and top_p >= 1.0:  # top_k at least the row's tokens: min_p alone
        return _then_min_p(np.float32(0.0), -1, min_p)  # everything, then min_p
    # top_p after top_k works within what top_k kept, so the k-th value inside is enough; the
    # margin covers the rounding between this pass's sums and the selection's
    target = top_p * total * (1.0 + 1e-5)
    for t, c_w, m_w in ((WINDOW, c1, m1), (WIDE_WINDOW, c2, m2)):
        if c_w >= k if k_on else m_w >= target:
            return _cut_in(_compress(p, t, np.float32(np.inf), c_w), k_on, k, top_p, min_p, total)
    return _cut_in(p, k_on, k, top_p, min_p, total)


@nb.njit(**_jit)
def _cut_in(vals, k_on, k, top_p, min_p, total):
    """_cut on vals: the row, or the row's values >= some threshold (in token-id order) when they
    hold the boundaries. total: the row's mass; k_on: top_k cuts (0 < k < positive tokens)."""
    vc, ties = np.float32(0.0), -1  # everything
    th = FIRST
    cnt, mass = _above(vals, th)
    kept = total
    if k_on:
        # ties at the k-th value all stay (Hugging Face, vLLM): keep p >= v
        v, c_gt, m_gt, c_ge, m_ge = _select(vals, th, cnt, mass, TINY, False, k)
        vc, kept = v, m_ge
    if top_p < 1.0:
        target = top_p * kept
        if vc > 0:  # top_p works within what top_k kept: those values only
            sub = _band(vals, vc, np.float32(np.inf))
            th2 = np.full(SPLITS, vc, np.float32)  # a first round that puts all of them in one band
            cnt2, mass2 = _above(sub, th2)
            v, c_gt, m_gt, c_ge, m_ge = _select(sub, th2, cnt2, mass2, vc, True, target)
        else:
            v, c_gt, m_gt, c_ge, m_ge = _select(vals, th, cnt, mass, TINY, True, target)
        if c_ge - c_gt == 1 or m_ge < target:
            vc, ties = v, -1  # one token at the boundary value (or rounding ran the walk out)
        else:
            # several tokens equal v: keep them in id order while the mass before each is < target
            n_keep, acc = 0, m_gt
            for i in range(vals.shape[0]):
                if vals[i] == v and acc < target:
                    acc += vals[i]
                    n_keep += 1
            vc, ties = v, n_keep
    return _then_min_p(vc, ties, min_p)


@nb.njit(**_jit)
def _cut_sorted(p, k, top_p, min_p):
    """_cut for a short row: sort its values once (descending) and walk them; ties at the cut are
    then settled in id order as _cut does."""
    s = np.sort(p)[::-1]
    n = 0  # tokens with p > 0
    while n < s.shape[0] and s[n] > 0:
        n += 1
    q = n  # the kept prefix: s[:q]
    if 0 < k < n:
        q = k
        while q < n and s[q] == s[k - 1]:  # ties at the k-th value stay
            q += 1
    vc, ties = (s[q - 1] if q else np.float32(0.0)), -1
    if top_p < 1.0 and q:
        kept = 0.0
        for i in range(q):
            kept += s[i]
        target, acc, a = top_p * kept, 0.0, 0
        while a < q and acc < target:
            acc += s[a]
            a += 1
        vc = s[a - 1]
        lo = a - 1  # the tokens equal to vc in the walk: s[lo:a]; more may follow
        while lo > 0 and s[lo - 1] == vc:
            lo -= 1
        if a < s.shape[0] and s[a] == vc:
            ties = a - lo  # in id order, as many as the walk took
    return _then_min_p(vc, ties, min_p)


@nb.njit(**_jit)
def _cut_picked(p, top_p, min_p):
    """_cut_sorted for top_p without top_k (top_p < 1), walking the values largest first without
    sorting them: each distinct value is found by a pass over the row (the largest below the last
    one) and its copies are taken one by one, as the sorted walk takes them, so the cut and its
    ties are the same. -> (vc, ties, True), or (0, -1, False) when the nucleus holds more than
    NUCLEUS_PICKS distinct values (the caller sorts)."""
    total = 0.0
    for i in range(p.shape[0]):
        total += p[i]  # the dropped-and-zero tokens add nothing
    target, acc = top_p * total, 0.0
    prev = np.float32(np.inf)
    vc, ties = np.float32(0.0), -1
    for _ in range(NUCLEUS_PICKS):
        v = np.float32(0.0)  # the largest value below prev
        for i in range(p.shape[0]):
            x = p[i]
            v = x if (x < prev and x > v) else v
        if v <= 0.0:  # every positive token is in: the walk ran out (rounding), as the sorted one does
            vc = prev
            break
        copies = 0
        for i in range(p.shape[0]):
            copies += p[i] == v
        took = 0
        while took < copies and acc < target:
            acc += v
            took += 1
        if acc >= target:
            vc, ties = v, (took if took < copies else -1)
            break
        prev = v
    else:
        return np.float32(0.0), -1, False
    vc, ties = _then_min_p(vc, ties, min_p)
    return vc, ties, True


@nb.njit(fastmath=True, **_jit)
def _block_sums(p, vc):
    """Mass of the tokens with p >= vc in each block of BLOCK tokens (a fixed-trip inner loop,
    which LLVM vectorises: see _count_mass)."""
    whole = p.shape[0] // BLOCK
    out = np.empty((p.shape[0] + BLOCK - 1) // BLOCK, np.float64)
    z = np.float32(0.0)
    for b in range(whole):
        base = b * BLOCK
        s = z  # float32 over 256 values is exact enough
        for i in range(BLOCK):
            x = p[base + i]
            s += x * np.float32(x >= vc)
        out[b] = s
    if out.shape[0] > whole:
        s = z
        for i in range(whole * BLOCK, p.shape[0]):
            x = p[i]
            s += x if x >= vc else z
        out[whole] = s
    return out


@nb.njit(**_jit)
def _draw(p, vc, ties, u):
    """Inverse CDF over the kept tokens (vc, ties) in token-id order."""
    V = p.shape[0]
    if ties >= 0:  # some tokens equal to vc are dropped: one plain pass for the mass, one to draw
        total, seen = 0.0, 0
        for i in range(V):
            x = p[i]
            if x > vc or (x == vc and seen < ties):
                total += x
            seen += x == vc
        t, c, last, seen = u * total, 0.0, -1, 0
        for i in range(V):
            x = p[i]
            if x > vc or (x == vc and seen < ties):
                if x > 0:
                    c += x
                    last = i
                    if c > t:
                        return i
            seen += x == vc
        return last
    sums = _block_sums(p, vc)
    t = u * sums.sum()
    c, b = 0.0, 0
    while b < sums.shape[0] - 1 and c + sums[b] <= t:
        c += sums[b]
        b += 1
    last = -1
    for i in range(b * BLOCK, min((b + 1) * BLOCK, V)):
        x = p[i]
        if x >= vc and x > 0:
            c += x
            last = i
            if c > t:
                return i
    if last >= 0:
        return last
    for i in range(V - 1, -1, -1):  # rounding ran past the end: the last kept token with mass
        if p[i] >= vc and p[i] > 0:
            return i
    return 0


@nb.njit(**_jit)
def _sample_row(p, u, k, top_p, min_p):
    """One row's token: a plain draw, or the kept set's boundary and then a draw within it."""
    if k <= 0 and top_p >= 1.0 and min_p <= 0.0:
        return _draw(p, np.float32(0.0), -1, u)
    vc, ties = _cut(p, k, top_p, min_p)
    return _draw(p, vc, ties, u)


@nb.njit(**_jit)
def sample_logits(logits, inv_t, u, top_k, top_p, min_p, rows, out, ok):
    """logits float32 [B, V] (C order), inv_t float32 [B] (1 / temperature), u float64 [B] in
    [0, 1), top_k int64 [B] (0: off), top_p float64 [B] (1: off), min_p float64 [B] (0: off):
    for each row in `rows`, its token into out int64 [B], or ok[row] = False when the row has no
    distribution (a NaN, a +inf or nothing but -inf)."""
    w = np.empty(logits.shape[1], np.float32)
    for j in range(rows.shape[0]):
        r = rows[j]
        ok[r] = weights_row(logits[r], inv_t[r], w)
        if ok[r]:
            out[r] = _sample_row(w, u[r], top_k[r], top_p[r], min_p[r])


@nb.njit(parallel=True, **_jit)
def sample_logits_parallel(logits, inv_t, u, top_k, top_p, min_p, rows, out, ok):
    """sample_logits with the rows shared among numba's threads (every core: ONNX Runtime's are
    idle while the sampler runs). Each row runs the same code as in sample_logits, so its token is
    the same whichever is called."""
    for j in prange(rows.shape[0]):
        r = rows[j]
        w = np.empty(logits.shape[1], np.float32)  # this row's: in the core's cache until drawn
        ok[r] = weights_row(logits[r], inv_t[r], w)
        if ok[r]:
            out[r] = _sample_row(w, u[r], top_k[r], top_p[r], min_p[r])


@nb.njit(**_jit)
def weights(logits, inv_t, w, ok):
    """Every row's weights into w float32 [B, V] (as sample_logits computes them; for tests and
    tools), ok bool [B]."""
    for r in range(logits.shape[0]):
        ok[r] = weights_row(logits[r], inv_t[r], w[r])


@nb.njit(**_jit)
def kept_sets(p, top_k, top_p, min_p, rows, vc_out, ties_out):
    """The kept set (vc, ties) of each row in `rows` of weights p [B, V], as sample_logits finds it
    (for tests)."""
    for j in range(rows.shape[0]):
        r = rows[j]
        vc_out[r], ties_out[r] = _cut(p[r], top_k[r], top_p[r], min_p[r])
