"""Row-wise asymmetric uniform quantization in fbgemm's fused SBHalf layout, and range searches.

Everything here is vectorised over rows (numpy, float32 arithmetic in the same order as the C++
it reproduces) and knows nothing about format names or validation: `embq.formats` does that.

Fused row layout (fbgemm `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`, ATen
`embedding_bag_{4,2}bit_prepack`)::

    [ceil(D * bits / 8) bytes of codes, element 0 in the low bits][fp16 scale][fp16 bias]

Quantization of a row with range (lo, hi), all float32 except where fp16 is named::

    bias  = fp16(lo)                                  # rounded first
    scale = fp16((hi - bias) / (2^bits - 1))          # 1.0 if hi - bias == 0, or if it rounds to 0
    q     = clamp(round_half_even((x - bias) * (1 / scale)), 0, 2^bits - 1)
    x_hat = q * scale + bias                          # exact in float32: q*scale needs <= 19 bits

Range searches (each returns float32 `lo[n]`, `hi[n]` to feed `encode_ranges`):

- `minmax_ranges`: the row min and max (what fbgemm and TorchRec use).
- `greedy_ranges`: the EMB4 GREEDY search of ATen `choose_qparams_optimized`, byte-identical to
  `torch.ops.quantized.embedding_bag_{4,2}bit_prepack(w, True, 200, 0.16)`.
- `opt_ranges` / `opt_qparams`: embq's better search (`int4-opt` / `int2-opt`).
- `exhaustive_ranges`: brute force over every (lo, hi) pair on the range/n_bins grid, the
  reference the better search is judged against (tests and benchmarks only; O(n_bins^2) per row).

Speed: GREEDY, the better search and `encode_ranges` run compiled numba kernels
(`embq.greedy_kernel`: rows in SIMD lanes, so every row keeps ATen's exact float32 order),
split into row pieces that this thread and a persistent pool (one thread per core) share. The
numpy implementations stay as the reference the kernels are tested against
(`greedy_ranges_numpy`, `opt_qparams_numpy`, `encode_ranges_numpy`) and as the fallback where
numba cannot load (or EMBQ_NO_NUMBA=1). numba compiles on first use and caches the machine code
in `embq/__pycache__` (a few seconds once, then ~0.1 s per process). In the numpy paths big
searches run row chunks on a thread pool (numpy releases the GIL inside its loops); fp16 casts
go through torch, whose vectorised cast is bit-identical to numpy's and ~10x faster.
"""

from __future__ import annotations

import threading

import numpy as np

F32 = np.float32
F16 = np.float16

# The 8 / bits codes that share one byte, per supported bit width.
SUPPORTED_BITS = (2, 4, 8)


def qmax_of(bits: int) -> int:
    """Largest code of a `bits`-bit quantizer (15 for 4 bits)."""
    return (1 << bits) - 1


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes of packed codes for one row of `dim` values at `bits` bits (no qparams)."""
    per_byte = 8 // bits
    return (dim + per_byte - 1) // per_byte


def fused_row_bytes(dim: int, bits: int) -> int:
    """Bytes of one fused SBHalf row: packed codes + fp16 scale + fp16 bias."""
    return packed_bytes(dim, bits) + 4


def _torch():
    import torch  # lazy: `import embq.formats` stays light

    return torch


_KERNELS: list = []  # [module or None], filled on first use
_POOL: list = []  # [(pid, ThreadPoolExecutor)]
_LOCK = threading.Lock()


def _kernels():
    """The compiled kernels module (`embq.greedy_kernel`), or None where numba is unavailable
    or disabled with EMBQ_NO_NUMBA=1. Imported lazily: numba takes ~0.3 s to import."""
    if not _KERNELS:
        with _LOCK:
            if not _KERNELS:
                import os

                mod = None
                if os.environ.get("EMBQ_NO_NUMBA", "") in ("", "0"):
                    try:
                        from embq import greedy_kernel as mod
                    except ImportError:  # numba missing or broken: the numpy paths are exact too
                        mod = None
                _KERNELS.append(mod)
    return _KERNELS[0]


def kernel_engine() -> str:
    """"numba" where the compiled kernels run, else "numpy"."""
    return "numpy" if _kernels() is None else "numba"


def kernel_threads() -> int:
    """Threads the row-wise searches use (this one plus pool threads): one per usable core."""
    return _workers()


def _workers() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pool(workers: int):
    """A persistent thread pool (recreated after a fork: pool threads do not survive one)."""
    import os

    pid = os.getpid()
    with _LOCK:
        if not _POOL or _POOL[0][0] != pid:
            from concurrent.futures import ThreadPoolExecutor

            _POOL[:] = [(pid, ThreadPoolExecutor(workers, thread_name_prefix="embq-rows"))]
        return _POOL[0][1]


def run_rows(fn, n: int, most: int = 8192, least: int = 256) -> None:
    """Call fn(r0, r1) over pieces [r0, r1) covering range(n): this thread and up to
    (cores - 1) pool threads take pieces until none are left. For GIL-free kernels; pieces are
    small (about n / (4 cores), at least `least` and at most `most` rows) so that a core slowed
    by other work on the machine simply takes fewer of them."""
    if n <= 0:
        return
    workers = _workers()
    size = max(1, min(most, max(least, -(-n // (4 * workers)))))
    pieces = [(r0, min(n, r0 + size)) for r0 in range(0, n, size)]
    if workers <= 1 or len(pieces) == 1:
        for r0, r1 in pieces:
            fn(r0, r1)
        return
    import itertools

    counter = itertools.count()  # next() on a count is atomic under the GIL
    errors: list = []

    def drain() -> None:
        while not errors:
            k = next(counter)
            if k >= len(pieces):
                return
            try:
                fn(*pieces[k])
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
                errors.append(e)
                return

    pool = _pool(workers)
    futs = [pool.submit(drain) for _ in range(min(workers, len(pieces)) - 1)]
    drain()
    for f in futs:
        if not f.cancel():  # started: wait for its current piece
            f.result()
    if errors:
        raise errors[0]


_SMALL = 2048  # below this many values numpy's cast beats torch's call overhead


def to_fp16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest even. Large arrays go through torch's vectorised
    cast, bit-identical to numpy's `astype(float16)` (ties, subnormals, overflow to inf
    included) and ~10x faster."""
    a = np.ascontiguousarray(x, dtype=F32)
    if a.size < _SMALL:
        with np.errstate(over="ignore"):
            return a.astype(F16)
    return _torch().from_numpy(a).to(_torch().float16).numpy()


def fp16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest fp16 (ties to even) and return them as float32."""
    a = np.ascontiguousarray(x, dtype=F32)
    if a.size < _SMALL:
        with np.errstate(over="ignore"):
            return a.astype(F16).astype(F32)
    t = _torch()
    return t.from_numpy(a).to(t.float16).to(t.float32).numpy()


def qparams(
    lo: np.ndarray, hi: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fbgemm / ATen qparams for ranges (lo, hi).

    Args:
        lo, hi: float32 [n], the clipping range of each row.
        bits: 2, 4 or 8.
    Returns:
        (scale16, bias16, inv_scale): float16 [n], float16 [n], float32 [n], where inv_scale is
        the float32 `1 / float(scale16)` the quantizer multiplies by.
    """
    lo = np.ascontiguousarray(lo, dtype=F32)
    hi = np.asarray(hi, dtype=F32)
    bias16 = to_fp16(lo)
    rng = hi - bias16.astype(F32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = fp16_round(rng / F32(qmax_of(bits)))
        if not rng.all():
            scale[rng == 0] = 1.0
        # fbgemm: a scale that rounds to 0 in fp16 (or whose inverse overflows) becomes 1.0.
        if scale.all():
            inv = F32(1.0) / scale
        else:
            inv = F32(1.0) / np.where(scale == 0, F32(1.0), scale)
        bad = (scale == 0) | np.isinf(inv)
    if bad.any():
        scale = np.where(bad, F32(1.0), scale)
        inv = np.where(bad, F32(1.0), inv)
    return to_fp16(scale), bias16, inv.astype(F32, copy=False)


def quantize_codes(
    x: np.ndarray, bias16: np.ndarray, inv_scale: np.ndarray, bits: int
) -> np.ndarray:
    """Codes `clamp(rint((x - bias) * inv_scale), 0, qmax)` as uint8 [n, d] (float32 math)."""
    u = (x - bias16.astype(F32)[:, None]) * inv_scale[:, None]
    np.rint(u, out=u)
    np.clip(u, 0, qmax_of(bits), out=u)
    return u.astype(np.uint8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes [n, d] LSB-first (element j in bits (j % per_byte) * bits of byte
    j // per_byte) into uint8 [n, packed_bytes(d, bits)]."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    n, d = codes.shape
    pad = (-d) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((n, pad), np.uint8)], axis=1)
    c = codes.reshape(n, (d + pad) // per_byte, per_byte)
    out = c[:, :, 0].copy()
    for k in range(1, per_byte):
        out |= c[:, :, k] << np.uint8(k * bits)
    return out


def unpack_codes(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 [n, packed_bytes] -> uint8 codes [n, dim]."""
    if bits == 8:
        return np.ascontiguousarray(packed[:, :dim], dtype=np.uint8)
    per_byte = 8 // bits
    mask = np.uint8(qmax_of(bits))
    n = packed.shape[0]
    shifts = (np.arange(per_byte, dtype=np.uint8) * np.uint8(bits))[None, None, :]
    codes = (packed[:, :, None] >> shifts) & mask
    return codes.reshape(n, packed.shape[1] * per_byte)[:, :dim]


def fuse(packed: np.ndarray, scale16: np.ndarray, bias16: np.ndarray) -> np.ndarray:
    """Concatenate packed codes [n, p], fp16 scale [n], fp16 bias [n] -> uint8 [n, p + 4]."""
    n = packed.shape[0]
    out = np.empty((n, packed.shape[1] + 4), np.uint8)
    out[:, : packed.shape[1]] = packed
    out[:, -4:-2] = scale16.astype("<f2").reshape(n, 1).view(np.uint8)
    out[:, -2:] = bias16.astype("<f2").reshape(n, 1).view(np.uint8)
    return out


def encode_ranges(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Quantize float32 rows [n, d] with per-row ranges into fused SBHalf rows uint8 [n, bpr].

    Values outside (lo, hi) clamp to the end codes, as `..._prepack_with_rowwise_min_max` does.
    Compiled (`greedy_kernel.encode_rows`), byte-identical to `encode_ranges_numpy`.
    """
    k = _kernels()
    if k is None:
        return encode_ranges_numpy(x, lo, hi, bits)
    x = np.ascontiguousarray(x, dtype=F32)
    lo = np.ascontiguousarray(lo, dtype=F32)
    hi = np.ascontiguousarray(hi, dtype=F32)
    n, d = x.shape
    out = np.empty((n, fused_row_bytes(d, bits)), np.uint8)
    if n:
        run_rows(lambda r0, r1: k.encode_rows(x, lo, hi, bits, r0, r1, out), n, least=2048)
    return out


def encode_ranges_numpy(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """`encode_ranges` in numpy (the reference the kernel is tested against)."""
    scale16, bias16, inv = qparams(lo, hi, bits)
    codes = quantize_codes(x, bias16, inv, bits)
    return fuse(pack_codes(codes, bits), scale16, bias16)


def split_fused(fused: np.ndarray, bits: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused rows uint8 [n, bpr] -> (codes uint8 [n, dim], scale float32 [n], bias float32 [n])."""
    n = fused.shape[0]
    qp = np.ascontiguousarray(fused[:, -4:]).view("<f2").reshape(n, 2).astype(F32)
    codes = unpack_codes(fused[:, :-4], bits, dim)
    return codes, qp[:, 0], qp[:, 1]


def decode_fused(fused: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Dequantize fused SBHalf rows: float32 [n, dim] = code * scale + bias.

    Equal to fbgemm's `FusedNBitRowwiseQuantizedSBHalfToFloat`: the product of a <= 8-bit code
    and an fp16 scale is exact in float32, so fused multiply-add or not gives the same bits.
    """
    codes, scale, bias = split_fused(fused, bits, dim)
    return codes.astype(F32) * scale[:, None] + bias[:, None]


def dequantize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Quantize-dequantize float32 rows [n, d] with ranges (lo, hi), float32 [n, d]."""
    scale16, bias16, inv = qparams(lo, hi, bits)
    q = quantize_codes(x, bias16, inv, bits).astype(F32)
    return q * scale16.astype(F32)[:, None] + bias16.astype(F32)[:, None]


def row_sse(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Squared error per row, float64 [n], of quantizing rows x with ranges (lo, hi)."""
    err = x.astype(np.float64) - dequantize(x, lo, hi, bits).astype(np.float64)
    return np.einsum("ij,ij->i", err, err)


def encode_minmax(x: np.ndarray, bits: int) -> np.ndarray:
    """Min/max fused rows uint8 [n, bpr] by fbgemm's own packer (the reference TorchRec uses),
    falling back to `encode_ranges` (byte-identical, tested) if fbgemm_gpu cannot load."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        op = _torch().ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf
    except (ImportError, AttributeError, RuntimeError):
        return encode_ranges(x, *minmax_ranges(x), bits)
    return op(_torch().from_numpy(np.ascontiguousarray(x, dtype=F32)), bits).numpy()


def minmax_ranges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row min and max, float32 [n] each (fbgemm's and TorchRec's choice)."""
    return row_extremes(x)


def row_extremes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each row of float32 [n, d] rows without NaN, float32 [n] each: one
    compiled pass over the rows (`greedy_kernel.row_extremes`), numpy where numba is off."""
    k = _kernels()
    if k is None or x.shape[1] == 0:
        return x.min(axis=1), x.max(axis=1)
    x = np.ascontiguousarray(x, dtype=F32)
    lo = np.empty(x.shape[0], F32)
    hi = np.empty(x.shape[0], F32)
    run_rows(lambda r0, r1: k.row_extremes(x, r0, r1, lo, hi), x.shape[0], least=4096)
    return lo, hi


# --------------------------------------------------------------------------- GREEDY (EMB4)


def greedy_loss_exact(xt: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """ATen `calculate_quant_loss`, bit for bit: the float32 L2 error of rows quantized with
    (lo, hi), summed sequentially over the row in float32, then sqrt.

    Args:
        xt: float32 [d, n], the rows TRANSPOSED (so the sum over axis 0 runs in row order and
            every numpy loop is contiguous over rows).
        lo, hi: float32 [n].
    Returns:
        float32 [n].
    """
    qmax = F32(qmax_of(bits))
    b = fp16_round(lo)
    rng = hi - b
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s = np.where(rng == 0, F32(1.0), fp16_round(rng / qmax)).astype(F32)
        inv = np.where(s == 0, F32(1.0), F32(1.0) / np.where(s == 0, F32(1.0), s)).astype(F32)
    t = xt - b
    t *= inv
    np.rint(t, out=t)
    np.clip(t, 0, qmax, out=t)
    t *= s
    t += b
    np.subtract(xt, t, out=t)
    t *= t
    # float32 accumulation in element order: numpy reduces the outer axis of a C-contiguous
    # array one slice at a time (pairwise summation only applies along the contiguous axis).
    return np.sqrt(np.add.reduce(t, axis=0))


def _qp32(lo: np.ndarray, hi: np.ndarray, qmax: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bias, scale, inv_scale) float32 as ATen `calculate_quant_loss` derives them from (lo, hi):
    unlike the packer, a scale that rounds to 0 stays 0 (and inv_scale is then 1)."""
    b = fp16_round(lo)
    rng = hi - b
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s = fp16_round(rng / qmax)
        if not rng.all():
            s[rng == 0] = 1.0
        if s.all():
            inv = F32(1.0) / s
        else:
            inv = (F32(1.0) / np.where(s == 0, F32(1.0), s)).astype(F32)
    return b, s, inv


def _fast_loss(xt: np.ndarray, b: np.ndarray, s: np.ndarray, inv: np.ndarray, qmax: np.float32,
               t: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The GREEDY loss up to rounding for g candidate qparams per row: ATen's codes (same
    float32 ops), the residual taken as scale * (u - code), summed in any order.

    Args:
        xt: float32 [d, n] (rows transposed). b, s, inv: float32 [g, n].
        t, q: float32 [g, d, n] scratch buffers.
    Returns:
        float32 [g, n].
    """
    np.subtract(xt[None], b[:, None, :], out=t)
    t *= inv[:, None, :]
    np.rint(t, out=q)
    np.clip(q, 0, qmax, out=q)
    t -= q
    t *= t
    return s * np.sqrt(np.add.reduce(t, axis=1))


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row min and max as std::min_element / max_element pick them: the first occurrence, so
    a row holding both -0.0 and 0.0 as its min gets the sign of the earlier one (which the
    fp16 bias keeps; numpy's min may return either)."""
    rows = np.arange(x.shape[0])
    return x[rows, x.argmin(axis=1)], x[rows, x.argmax(axis=1)]


def _greedy_exact_rows(x: np.ndarray, bits: int, n_bins: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """GREEDY computed with `greedy_loss_exact` only: ATen's loop, vectorised over rows.

    The plain reference the fast path falls back to (and is tested against). A row whose
    position stops moving (ATen would loop forever) stops there.
    """
    xt = np.ascontiguousarray(x.T)
    xmin, xmax = _first_min_max(x)
    step = (xmax - xmin) / F32(n_bins)
    thr = F32(np.float32(n_bins * (1.0 - ratio))) * step
    a, z = xmin.copy(), xmax.copy()
    ans_a, ans_z = xmin.copy(), xmax.copy()
    cur = greedy_loss_exact(xt, a, z, bits)
    best = cur.copy()
    live = np.flatnonzero(a + thr < z)
    while live.size:
        sub = np.ascontiguousarray(xt[:, live])
        al, zl, sl = a[live], z[live], step[live]
        left = greedy_loss_exact(sub, al + sl, zl, bits)
        right = greedy_loss_exact(sub, al, zl - sl, bits)
        c = cur[live]
        local = (c < left) & (c < right) & (c < best[live])
        best[live[local]] = c[local]
        ans_a[live[local]] = al[local]
        ans_z[live[local]] = zl[local]
        go_left = left < right  # ties move the upper edge
        new_a = np.where(go_left, al + sl, al)
        new_z = np.where(go_left, zl, zl - sl)
        moved = (new_a != al) | (new_z != zl)
        a[live], z[live] = new_a, new_z
        cur[live] = np.where(go_left, left, right)
        live = live[moved & (new_a + thr[live] < new_z)]
    return ans_a, ans_z


def _greedy_chunk(x: np.ndarray, bits: int, n_bins: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """GREEDY ranges of one chunk of rows x float32 [m, d]; see `greedy_ranges`.

    Every loss is first computed by `_fast_loss`. Its error against ATen's `greedy_loss_exact`
    is bounded per row: the distance of u = (x - bias) / scale to the nearest code is
    1-Lipschitz in u, so by the triangle inequality for L2 norms the two losses differ by at
    most sqrt(d) times the per-value error of the residual, which float32 rounding bounds by
    ~(max|x| + 3 * range) * 2^-24 (ATen rounds the level q*scale + bias and x - level; the fast
    pass rounds x - bias, the product by 1/scale and u - q); the two sequential float32 sums of
    d terms, the sqrts and the product by the scale add <= (d/2 + 3) * 2^-24 relative per loss
    (padded to 3 (d + 8) 2^-24 for the pair, 1.3e-5 at d = 64). Wherever a comparison the search makes is within
    twice that bound, the row's four losses in play are recomputed exactly before deciding.
    Rows still searching after the longest normal path (~n_bins * ratio steps; only rows whose
    position stops moving) are redone by `_greedy_exact_rows`.
    """
    m, d = x.shape
    qmax = F32(qmax_of(bits))
    xt = np.ascontiguousarray(x.T)
    t = np.empty((2, d, m), F32)
    q = np.empty_like(t)
    xmin, xmax = _first_min_max(x)
    step = (xmax - xmin) / F32(n_bins)
    thr = F32(np.float32(n_bins * (1.0 - ratio))) * step
    mag = np.maximum(np.abs(xmin), np.abs(xmax)) + F32(3.0) * (xmax - xmin)
    abs_tol = F32(4.0 * np.sqrt(d) * 2.0**-24) * mag  # 2x the bound: one per loss compared
    rel_tol = F32(3.0 * (d + 8) * 2.0**-24)  # 1.3e-5 at d = 64

    a, z = xmin.copy(), xmax.copy()
    ans_a, ans_z = xmin.copy(), xmax.copy()
    b0, s0, i0 = _qp32(a[None], z[None], qmax)
    cur = _fast_loss(xt, b0, s0, i0, qmax, t[:1], q[:1])[0]
    if not s0.all():  # a scale that rounds to 0 breaks the fast residual: exact
        zero = np.flatnonzero(s0[0] == 0)
        cur[zero] = greedy_loss_exact(np.ascontiguousarray(xt[:, zero]), a[zero], z[zero], bits)
    best = cur.copy()
    active = a + thr < z
    lo2 = np.empty((2, m), F32)
    hi2 = np.empty((2, m), F32)
    diff = np.empty((4, m), F32)
    for it in range(int(n_bins * ratio) + 4):
        if not active.any():
            break
        np.add(a, step, out=lo2[0])
        lo2[1] = a
        hi2[0] = z
        np.subtract(z, step, out=hi2[1])
        b2, s2, i2 = _qp32(lo2, hi2, qmax)
        left, right = _fast_loss(xt, b2, s2, i2, qmax, t, q)
        np.subtract(left, right, out=diff[0])
        np.subtract(cur, left, out=diff[1])
        np.subtract(cur, right, out=diff[2])
        np.subtract(cur, best, out=diff[3])
        if it == 0:
            diff[3] = np.inf  # best is cur itself: ATen's cur < best is false
        close = np.abs(diff).min(axis=0) <= abs_tol + rel_tol * cur
        if not s2.all():
            close |= (s2 == 0).any(axis=0)
        close &= active
        if close.any():
            idx = np.flatnonzero(close)
            k = idx.size
            ex = greedy_loss_exact(
                np.tile(xt[:, idx], (1, 4)),
                np.concatenate([lo2[0, idx], a[idx], a[idx], ans_a[idx]]),
                np.concatenate([z[idx], hi2[1, idx], z[idx], ans_z[idx]]),
                bits,
            )
            left[idx], right[idx], cur[idx], best[idx] = ex[:k], ex[k : 2 * k], ex[2 * k : 3 * k], ex[3 * k :]
            diff[0, idx] = left[idx] - right[idx]
            diff[1, idx] = cur[idx] - left[idx]
            diff[2, idx] = cur[idx] - right[idx]
            if it > 0:
                diff[3, idx] = cur[idx] - best[idx]
        go_left = diff[0] < 0  # ties move the upper edge, as in ATen
        if it > 0:
            # ATen: cur < left and cur < right and cur < best marks a new best range
            local = (diff[1] < 0) & (diff[2] < 0) & (diff[3] < 0) & active
            if local.any():
                np.copyto(best, cur, where=local)
                np.copyto(ans_a, a, where=local)
                np.copyto(ans_z, z, where=local)
        # rows no longer active keep moving here, harmlessly: nothing of theirs is read again
        np.copyto(a, lo2[0], where=go_left)
        np.copyto(z, hi2[1], where=~go_left)
        cur = np.where(go_left, left, right)
        active &= a + thr < z
    if active.any():
        stuck = np.flatnonzero(active)
        ans_a[stuck], ans_z[stuck] = _greedy_exact_rows(x[stuck], bits, n_bins, ratio)
    return ans_a, ans_z


def greedy_ranges(
    x: np.ndarray, bits: int, n_bins: int = 200, ratio: float = 0.16, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """EMB4 GREEDY ranges, identical to ATen `choose_qparams_optimized`.

    Args:
        x: float32 [n, d], finite.
        bits: 4 or 2 (8 works too).
        n_bins, ratio: the step is range / n_bins; at most `ratio` of the range is clipped.
        chunk: at most this many rows per work item (items are shared by this thread and one
            pool thread per other core).
    Returns:
        (lo, hi) float32 [n] each; `encode_ranges(x, lo, hi, bits)` then equals
        `torch.ops.quantized.embedding_bag_{bits}bit_prepack(x, True, n_bins, ratio)`.

    Runs `greedy_kernel.greedy_rows`: ATen's scalar search compiled, rows side by side in
    SIMD lanes (32 per block), every loss summed in ATen's float32 order (so every comparison,
    and the result, is ATen's). Rows on which ATen would never terminate (the step is absorbed
    by float32 rounding, e.g. values near 1.0 with a range below ~1e-6, so the position stops
    moving while the stop test stays true) are returned at the best range found when the
    position stops changing. Falls back to `greedy_ranges_numpy` (same results) without numba.
    """
    k = _kernels()
    if k is None:
        return greedy_ranges_numpy(x, bits, n_bins, ratio, chunk)
    x = np.ascontiguousarray(x, dtype=F32)
    n = x.shape[0]
    lo = np.empty(n, F32)
    hi = np.empty(n, F32)
    if n == 0:
        return lo, hi
    if x.shape[1] == 0:
        raise ValueError("greedy_ranges: rows of dimension 0 have no range")
    qmax, nb, min_bins = F32(qmax_of(bits)), F32(n_bins), F32(np.float32(n_bins * (1.0 - ratio)))
    run_rows(lambda r0, r1: k.greedy_rows(x, r0, r1, qmax, nb, min_bins, lo, hi), n, most=chunk)
    return lo, hi


def greedy_ranges_numpy(
    x: np.ndarray, bits: int, n_bins: int = 200, ratio: float = 0.16, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """`greedy_ranges` in numpy: the reference the compiled kernel is tested against.

    Args:
        x: float32 [n, d], finite.
        bits: 4 or 2 (8 works too).
        n_bins, ratio: the step is range / n_bins; at most `ratio` of the range is clipped.
        chunk: rows per work item (chunks run on a thread pool, one thread per core).
    Returns:
        (lo, hi) float32 [n] each; `encode_ranges(x, lo, hi, bits)` then equals
        `torch.ops.quantized.embedding_bag_{bits}bit_prepack(x, True, n_bins, ratio)`.

    How: the search path depends only on comparisons between losses. A fast pass computes
    every loss with the same float32 codes as ATen but a cheaper residual; wherever two losses
    are closer than a proven bound on the fast pass's error, those rows are re-evaluated with
    `greedy_loss_exact` (ATen's exact float32 order), so every decision matches ATen's.

    Rows on which ATen would never terminate (the step is absorbed by float32 rounding, e.g.
    values near 1.0 with a range below ~1e-6, so the position stops moving while the stop test
    stays true) are returned at the best range found when the position stops changing.
    """
    x = np.ascontiguousarray(x, dtype=F32)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, F32), np.zeros(0, F32)
    chunk = _chunk_rows(n, chunk)
    starts = list(range(0, n, chunk))
    lo = np.empty(n, F32)
    hi = np.empty(n, F32)

    def work(i: int) -> None:
        lo[i : i + chunk], hi[i : i + chunk] = _greedy_chunk(x[i : i + chunk], bits, n_bins, ratio)

    run_chunks(work, starts)
    return lo, hi


def _chunk_rows(n: int, most: int, least: int = 256) -> int:
    """Rows per work item: at most `most`, but small enough to give every core work."""
    import os

    cores = os.cpu_count() or 1
    return max(least, min(most, -(-n // cores)))


def run_chunks(fn, items: list) -> None:
    """Call fn(item) for every item on a thread pool with one thread per core (numpy and
    torch release the GIL inside their loops), or in this thread when one worker suffices."""
    import os

    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        for it in items:
            fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, items))


# --------------------------------------------------------------------------- better searches


def _fp16_step(v: np.ndarray, k: int) -> np.ndarray:
    """The fp16 value k steps (ulps) away from fp16 value v (float32 in, float32 out)."""
    h = v.astype(F16).view(np.int16).astype(np.int32)
    # fp16 bit patterns are monotone in value for each sign; walk in value order
    key = np.where(h < 0, -(h & 0x7FFF), h) + k
    out = np.where(key < 0, (-key) | 0x8000, key).astype(np.uint16).view(F16)
    return out.astype(F32)


class _Candidates:
    """Evaluates batches of clipping ranges for a chunk of rows and keeps each row's best fp16
    (scale, bias). Scores are `_fast_loss` squared (the packer's float32 codes, residuals
    summed in float32: relative error ~1e-5 at worst, plenty to rank candidates)."""

    def __init__(self, x: np.ndarray, bits: int, n_bins: int) -> None:
        self.bits = bits
        self.qmax = F32(qmax_of(bits))
        self.xt = np.ascontiguousarray(x.T)  # [d, n]
        x64 = x.astype(np.float64)
        self.xmin, self.xmax = x64.min(axis=1), x64.max(axis=1)
        self.step = (self.xmax - self.xmin) / n_bins
        self.n_bins = n_bins
        n = x.shape[0]
        self.best = np.full(n, np.inf)
        self.best_i = np.zeros(n, np.int64)
        self.best_j = np.zeros(n, np.int64)
        self.best_s = np.ones(n, F32)
        self.best_b = np.zeros(n, F32)
        self._buf: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _score(self, s: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Squared error float64 [g, n] for g candidate (scale, bias) float32 [g, n]."""
        g = s.shape[0]
        if g not in self._buf:
            shape = (g, *self.xt.shape)
            self._buf[g] = (np.empty(shape, F32), np.empty(shape, F32))
        t, q = self._buf[g]
        loss = _fast_loss(self.xt, b, s, (F32(1.0) / s).astype(F32), self.qmax, t, q)
        return loss.astype(np.float64) ** 2

    def _keep(self, sse: np.ndarray, s: np.ndarray, b: np.ndarray,
              i: np.ndarray | None = None, j: np.ndarray | None = None) -> None:
        k = sse.argmin(axis=0)
        cols = np.arange(sse.shape[1])
        v = sse[k, cols]
        better = v < self.best
        self.best = np.where(better, v, self.best)
        self.best_s = np.where(better, s[k, cols], self.best_s)
        self.best_b = np.where(better, b[k, cols], self.best_b)
        if i is not None:
            self.best_i = np.where(better, i[k, cols], self.best_i)
            self.best_j = np.where(better, j[k, cols], self.best_j)

    def grid(self, i: np.ndarray, j: np.ndarray) -> None:
        """Try lo = min + i*step, hi = max - j*step for int [g, n] (or broadcastable) i, j;
        pairs outside i, j >= 0, i + j < n_bins are skipped."""
        n = self.xmin.shape[0]
        i, j = np.broadcast_arrays(np.asarray(i), np.asarray(j))
        i = np.broadcast_to(i, (i.shape[0], n))
        j = np.broadcast_to(j, (j.shape[0], n))
        ok = (i >= 0) & (j >= 0) & (i + j < self.n_bins)
        lo = (self.xmin + i * self.step).astype(F32)
        hi = (self.xmax - j * self.step).astype(F32)
        s16, b16, _ = qparams(lo.ravel(), hi.ravel(), self.bits)
        s = s16.astype(F32).reshape(i.shape)
        b = b16.astype(F32).reshape(i.shape)
        self._keep(np.where(ok, self._score(s, b), np.inf), s, b, i, j)

    def qp(self, s: np.ndarray, b: np.ndarray) -> None:
        """Try fp16-exact (scale, bias) float32 [g, n]; scale <= 0 is skipped."""
        ok = s > 0
        s = np.where(ok, s, F32(1.0)).astype(F32)
        self._keep(np.where(ok, self._score(s, b), np.inf), s, b)


def _batches(pairs: list[tuple[int, int]], size: int):
    """Split (i, j) pairs into int arrays [g, 1] of at most `size` candidates."""
    for k in range(0, len(pairs), size):
        a = np.array(pairs[k : k + size], np.int64)
        yield a[:, :1], a[:, 1:]


def _ls_step(xt: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """One least-squares refit of the grid b + s*k to the codes of (s, b), rounded to fp16."""
    d = xt.shape[0]
    t = xt - b
    t *= (F32(1.0) / s).astype(F32)
    np.rint(t, out=t)
    np.clip(t, 0, qmax_of(bits), out=t)
    # float64 sums in element order (the outer axis of a C-contiguous array is reduced one
    # slice at a time), as the compiled kernel sums them
    t64 = t.astype(np.float64)
    x64 = xt.astype(np.float64)
    sq = np.add.reduce(t64, axis=0)
    sqq = np.add.reduce(t64 * t64, axis=0)
    sxq = np.add.reduce(t64 * x64, axis=0)
    sx = np.add.reduce(x64, axis=0)
    var = sqq - sq * sq / d
    cov = sxq - sq * sx / d
    ok = var > 0
    s_new = np.where(ok, cov / np.where(ok, var, 1.0), s)
    b_new = (sx - s_new * sq) / d
    return fp16_round(np.maximum(s_new, 0.0)), fp16_round(b_new)


def _opt_plan(bits: int, n_bins: int, d: int) -> dict:
    """The candidate schedule of the better search (shared by the numpy and compiled paths):
    grid starts `pairs` (scored in batches of 8, in order), pattern-search `strides`, the
    wider `far_strides` for rows whose best lies outside the `corner`, `ks` (ranks of the
    order-statistic starts, scored first) and `polish` rounds."""
    corner = 10
    if bits >= 4:
        pairs = [(i, j) for i in range(0, n_bins, 50) for j in range(0, n_bins - i, 50)]
        pairs += [(i, j) for i in range(0, corner + 1, 2) for j in range(0, corner + 1, 2)
                  if (i, j) not in pairs]
        return dict(pairs=pairs, strides=(1,), far_strides=(16, 8, 4, 2, 1), corner=corner,
                    ks=(), polish=1)
    pairs = [(i, j) for i in range(0, n_bins, 20) for j in range(0, n_bins - i, 20)]
    # one end kept, the other clipped at an order statistic: a heavy-tailed row's outlier
    # can deserve a level of its own while the other levels fit the bulk
    ks = tuple(min(int(round(f * (d - 1))), (d - 1) // 2) for f in (0.02, 0.05, 0.1, 0.16, 0.25))
    return dict(pairs=pairs, strides=(10, 5, 2, 1), far_strides=(), corner=corner, ks=ks, polish=2)


def opt_qparams(x: np.ndarray, bits: int, n_bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """embq's better range search (`int4-opt`, `int2-opt`): per-row fp16 (scale, bias)
    minimising the squared error, judged against `exhaustive_ranges`.

    On the (i, j) grid lo = min + i*step, hi = max - j*step (step = range / n_bins), it keeps
    the best range visited (not GREEDY's strict local minimum) over:
      1. starts: at 4+ bits a stride-2 grid over the low-clipping corner i, j <= 10, where
         the optimum almost always lies; at 2 bits ranges between order statistics (2% to
         25% of the values clipped at each end, also skewed or at one end only, as an outlier
         can deserve a level of its own), since the 4-level optimum clips
         15-40% of the range, beyond GREEDY's 16% reach; both plus a stride-50 grid over the
         whole triangle i + j < n_bins for unusual rows;
      2. a pattern search: the 8 neighbours of the best at strides (10, 5, 2, 1) at 2 bits;
         at 4+ bits stride 1, and (16, 8, 4, 2, 1) only for rows whose best is outside the
         corner;
      3. one least-squares refit of (scale, bias) to the best codes, rounded to fp16;
      4. the 8 neighbouring fp16 values of (scale, bias), twice at 2 bits; this leaves the
         grid, so the result can beat the exhaustive grid optimum.
    About 65 (4-bit) to 110 (2-bit) range evaluations per row; no clipping limit.

    Runs the compiled `greedy_kernel.opt_rows` (16 rows per SIMD register), which scores
    the same candidates in the same order with the same float32 / float64 arithmetic as
    `opt_qparams_numpy`, so both return the same bits (tested); the numpy version runs where
    numba is unavailable.

    Args:
        x: float32 [n, d], finite. bits: 2, 4 or 8.
    Returns:
        (scale, bias) float32 [n] each, exactly representable in fp16, scale > 0.
    """
    k = _kernels()
    x = np.ascontiguousarray(x, dtype=F32)
    n, d = x.shape
    if k is None or n == 0 or d == 0:
        return opt_qparams_numpy(x, bits, n_bins)
    plan = _opt_plan(bits, n_bins, d)
    pairs = np.array(plan["pairs"], np.int64).reshape(-1, 2)
    args = (F32(qmax_of(bits)), float(n_bins), np.ascontiguousarray(pairs[:, 0]),
            np.ascontiguousarray(pairs[:, 1]), np.array(plan["strides"], np.int64),
            np.array(plan["far_strides"], np.int64), float(plan["corner"]),
            np.array(plan["ks"], np.int64), int(plan["polish"]))
    scale = np.empty(n, F32)
    bias = np.empty(n, F32)
    run_rows(lambda r0, r1: k.opt_rows(x, r0, r1, k.LANES, *args, scale, bias), n, least=128)
    return scale, bias


def opt_qparams_numpy(x: np.ndarray, bits: int, n_bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """`opt_qparams` in numpy: the reference the compiled kernel is tested against."""
    x = np.ascontiguousarray(x, dtype=F32)
    c = _Candidates(x, bits, n_bins)
    ring = np.array([(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj])
    plan = _opt_plan(bits, n_bins, x.shape[1])
    corner, strides, polish = plan["corner"], plan["strides"], plan["polish"]
    if plan["ks"]:
        xs = np.sort(x, axis=1).astype(np.float64)
        d = x.shape[1]
        step = np.where(c.step > 0, c.step, 1.0)  # constant rows: every range is the same
        for k in plan["ks"]:
            i = np.rint((xs[:, k] - c.xmin) / step).astype(np.int64)
            j = np.rint((c.xmax - xs[:, d - 1 - k]) / step).astype(np.int64)
            c.grid(np.stack([i, np.zeros_like(i)]), np.stack([np.zeros_like(j), j]))
    for i, j in _batches(plan["pairs"], 8):
        c.grid(i, j)
    for stride in strides:
        c.grid(c.best_i[None] + stride * ring[:, :1], c.best_j[None] + stride * ring[:, 1:])
    if plan["far_strides"]:
        far = np.flatnonzero((c.best_i > corner) | (c.best_j > corner))
        if far.size:  # rare rows (e.g. one extreme outlier): search around their best
            sub = _Candidates(x[far], bits, n_bins)
            sub.best, sub.best_i, sub.best_j = c.best[far], c.best_i[far], c.best_j[far]
            sub.best_s, sub.best_b = c.best_s[far], c.best_b[far]
            for stride in plan["far_strides"]:
                sub.grid(sub.best_i[None] + stride * ring[:, :1], sub.best_j[None] + stride * ring[:, 1:])
            c.best[far], c.best_s[far], c.best_b[far] = sub.best, sub.best_s, sub.best_b
    s1, b1 = _ls_step(c.xt, c.best_s, c.best_b, bits)
    c.qp(s1[None], b1[None])
    for _ in range(polish):
        s0, b0 = c.best_s, c.best_b
        c.qp(np.stack([_fp16_step(s0, ds) for ds, _ in ring]),
             np.stack([_fp16_step(b0, db) for _, db in ring]))
    return c.best_s, c.best_b


def ranges_for_qparams(scale: np.ndarray, bias: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float32 [n] for which `qparams(lo, hi, bits)` gives exactly fp16 (scale, bias),
    so any (scale, bias) can go through `encode_ranges` / `..._prepack_with_rowwise_min_max`."""
    lo = bias.astype(F32)
    qmax = F32(qmax_of(bits))
    hi = (lo + scale.astype(F32) * qmax).astype(F32)
    for _ in range(4):  # float32 rounding of lo + scale*qmax can land next to the intended scale
        got = fp16_round((hi - lo) / qmax)
        off = got != scale
        if not off.any():
            break
        direction = np.sign(scale - got).astype(F32)
        hi = np.where(off, np.nextafter(hi, hi + direction * np.float32(np.inf)), hi).astype(F32)
    return lo, hi


def opt_ranges(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranges (lo, hi) float32 [n] of `opt_qparams` (embq's better search, `int{4,2}-opt`)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if x.shape[0] == 0:
        return np.zeros(0, F32), np.zeros(0, F32)
    if _kernels() is not None:
        return ranges_for_qparams(*opt_qparams(x, bits), bits)
    out_lo = np.empty(x.shape[0], F32)
    out_hi = np.empty(x.shape[0], F32)
    chunk = _chunk_rows(x.shape[0], 1024)  # [8, d, 1024] float32 buffers stay cache-sized

    def work(i: int) -> None:
        sc, bi = opt_qparams_numpy(x[i : i + chunk], bits)
        out_lo[i : i + chunk], out_hi[i : i + chunk] = ranges_for_qparams(sc, bi, bits)

    run_chunks(work, list(range(0, x.shape[0], chunk)))
    return out_lo, out_hi


def exhaustive_ranges(
    x: np.ndarray, bits: int, n_bins: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (lo, hi) over all pairs lo = min + i*step < hi = max - j*step (i, j >= 0,
    i + j < n_bins, step = (max - min) / n_bins in float64), scored by the exact squared error
    with fp16 qparams. The reference the better search is judged against: ~n_bins^2 / 2
    quantizations per row (about 20k at n_bins = 200), for tests and benchmarks only.

    Returns:
        (lo float32 [n], hi float32 [n], sse float64 [n]).
    """
    x = np.ascontiguousarray(x, dtype=F32)
    n, d = x.shape
    x64 = x.astype(np.float64)
    xmin, xmax = x64.min(axis=1), x64.max(axis=1)
    step = (xmax - xmin) / n_bins
    best = np.full(n, np.inf)
    best_lo = xmin.astype(F32)
    best_hi = xmax.astype(F32)
    jj = np.arange(n_bins)
    for i in range(n_bins):
        js = jj[: n_bins - i]  # i + j < n_bins keeps lo < hi
        lo = np.repeat((xmin + i * step).astype(F32)[:, None], js.size, axis=1)  # [n, J]
        hi = (xmax[:, None] - js[None, :] * step[:, None]).astype(F32)
        scale16, bias16, inv = qparams(lo.ravel(), hi.ravel(), bits)
        sc = scale16.astype(F32).reshape(n, -1, 1)
        bi = bias16.astype(F32).reshape(n, -1, 1)
        t = (x[:, None, :] - bi) * inv.reshape(n, -1, 1)
        np.rint(t, out=t)
        np.clip(t, 0, qmax_of(bits), out=t)
        t *= sc
        t += bi
        e = x64[:, None, :] - t
        sse = np.einsum("njd,njd->nj", e, e)
        k = sse.argmin(axis=1)
        v = sse[np.arange(n), k]
        better = v < best
        best = np.where(better, v, best)
        best_lo = np.where(better, lo[np.arange(n), k], best_lo)
        best_hi = np.where(better, hi[np.arange(n), k], best_hi)
    return best_lo, best_hi, best
