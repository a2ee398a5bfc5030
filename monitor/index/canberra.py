"""Exact k-NN under the Canberra distance ``sum_d |x_d - y_d| / (|x_d| + |y_d|)``.

Terms with ``|x_d| + |y_d| == 0`` count 0 (as FAISS does). Ties are broken by
the lower reference id.

Two implementations, one answer:

* :func:`canberra_distances` / :func:`canberra_knn_reference` -- plain blocked
  numpy in float64: the definition, and what the tests compare against.
* :func:`canberra_knn` -- the fast path (numba, parallel over query blocks):

  1. *seed*: an approximate pass over a sample of dimensions picks, per
     query, the ``k`` most promising references; the largest of their
     (float32) distances is a first upper bound on the k-th neighbour
     distance (any k references bound it);
  2. *scan*: a fused, cache-blocked kernel walks query blocks (in
     parallel) x reference tiles; a 4 x 2 register block (four queries x two
     references, :func:`_make_block`, written in LLVM IR on 8-lane vectors)
     accumulates eight float32 distances per pass over a chunk of ``CHUNK``
     dimensions as ``|x - y| * rcp(|x| + 1e-30 + |y|)`` with one ``vrcpps``
     per 8 terms and no Newton step (relative error <= 1.5 * 2**-12; without
     AVX an IEEE division), and between chunks abandons a pair once its
     partial sum exceeds the query's current bound (terms are >= 0); every
     pair's float32 value (a partial sum if abandoned: a lower bound) is
     kept, and the survivors enter a bounded max-heap of ``k + pad``
     candidates;
  3. *certify*: the candidates are re-scored in float64 (same formula as the
     reference) and sorted by (distance, id); their k-th distance ``T`` bounds
     the true k-th from above. Every float32 value is at most
     ``(1 + eps) x`` the true distance (:func:`scan_eps`), so only references
     with a value ``<= T (1 + eps)`` can still belong to the k nearest; any of
     them not among the candidates is re-scored in float64 as well. So the
     result always equals the float64 brute force, ties included, whatever
     the float32 error, pad or bound.

Policy: inputs with NaN are rejected (ValueError); numba missing falls back to
the numpy reference with a warning.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

CHUNK = 1024  # dims per early-abandon check (a multiple of 8; abandoning rarely pays on this data)


def scan_eps(dim: int, chunk: int = CHUNK, rcp: bool = True) -> float:
    """Bound on the relative error of the scan's float32 distances (all terms are >= 0).

    Per term: ``vrcpps`` (relative error <= 1.5 * 2**-12 by the x86
    specification; 2**-11 taken) or an IEEE division, plus the roundings of
    ``x - y``, ``|x| + |y|`` and the product; the sum: ``chunk / 8`` additions
    per vector lane, 3 across lanes, one per chunk (positive terms, so the
    relative error of the sum is at most that of its terms plus
    (additions) x 2**-24). A margin of 1.25 covers the second-order terms.
    """
    u = 2.0**-24
    term = (2.0**-11 if rcp else u) + 3 * u
    return 1.25 * (term + (chunk // 8 + 3 + -(-dim // chunk) + 8) * u)


def canberra_distances(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """(Q, N) exact Canberra distances in float64, blocked to bound memory."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(refs, dtype=np.float64)
    out = np.empty((q.shape[0], r.shape[0]), dtype=np.float64)
    ra = np.abs(r)
    block = max(1, int(2**24 // max(1, r.shape[1] * 8)))
    for i, x in enumerate(q):
        xa = np.abs(x)
        for s in range(0, r.shape[0], block):
            num = np.abs(r[s : s + block] - x)
            den = ra[s : s + block] + xa
            out[i, s : s + block] = np.divide(num, den, out=np.zeros_like(num), where=den > 0).sum(axis=1)
    return out


def canberra_knn_reference(queries: np.ndarray, refs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: (distances float64, ids int64) of the k nearest, ties to the lower id."""
    d = canberra_distances(queries, refs)
    k = min(k, d.shape[1])
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx.astype(np.int64)


def _avx_ok() -> bool:
    """True when numba compiles for this host and the host has AVX (for ``vrcpps`` on 8 lanes)."""
    try:
        import llvmlite.binding as llb
        from numba.core import config

        if getattr(config, "CPU_NAME", None) not in (None, "host") or getattr(config, "CPU_FEATURES", None) is not None:
            return False
        return bool(llb.get_host_cpu_features().get("avx", False))
    except Exception:  # pragma: no cover - defensive: any doubt -> portable kernel
        return False


def _make_block(nq_: int, nr_: int, nonneg: bool, rcp: bool):  # pragma: no cover - numba codegen
    """A numba intrinsic: the ``nq_ x nr_`` Canberra partial sums of one register block over one chunk.

    ``block(q, qa, r, i0.., j0.., s, n8)`` returns the ``nq_ * nr_`` float32
    sums (query-major) of ``|x - y| * 1/(xa + |y|)`` over dimensions
    ``s .. s + n8`` (``n8`` a multiple of 8), where ``xa = |x| + 1e-30`` is
    precomputed per query. Written directly in LLVM IR on ``<8 x float>``
    vectors so that ``1/den`` is a single ``vrcpps`` (``rcp``; relative error
    <= 1.5 * 2**-12, no Newton step: the certification slack covers it) or an
    IEEE division (portable). ``nonneg``: the references are known to be >= 0,
    so ``|y|`` is ``y``.
    """
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    f8 = ir.VectorType(ir.FloatType(), 8)
    i64 = ir.IntType(64)
    npair = nq_ * nr_

    @intrinsic
    def block(typingctx, q, qa, r, rows, s, n8):  # type: ignore[no-untyped-def]
        sig = types.UniTuple(types.float32, npair)(q, qa, r, rows, s, n8)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            qv, qav, rv, rowsv, sv, n8v = args
            aq = context.make_array(signature.args[0])(context, builder, qv)
            aqa = context.make_array(signature.args[1])(context, builder, qav)
            ar = context.make_array(signature.args[2])(context, builder, rv)
            dim = builder.extract_value(aq.shape, 1)
            s64 = builder.sext(sv, i64) if sv.type.width < 64 else sv
            n = builder.sext(n8v, i64) if n8v.type.width < 64 else n8v

            def rowptr(a, t):  # type: ignore[no-untyped-def]
                row = builder.extract_value(rowsv, t)
                row = builder.sext(row, i64) if row.type.width < 64 else row
                return builder.gep(a.data, [builder.add(builder.mul(row, dim), s64)])

            xs = [rowptr(aq, t) for t in range(nq_)]
            xas = [rowptr(aqa, t) for t in range(nq_)]
            ys = [rowptr(ar, nq_ + u) for u in range(nr_)]
            mod = builder.module
            rcpf = mod.declare_intrinsic("llvm.x86.avx.rcp.ps.256", fnty=ir.FunctionType(f8, [f8])) if rcp else None
            fabs = mod.declare_intrinsic("llvm.fabs.v8f32", fnty=ir.FunctionType(f8, [f8]))
            pre = builder.block
            fn = builder.function
            head = fn.append_basic_block("cb_head")
            body = fn.append_basic_block("cb_body")
            done = fn.append_basic_block("cb_done")
            builder.branch(head)
            builder.position_at_end(head)
            d = builder.phi(i64)
            accs = [builder.phi(f8) for _ in range(npair)]
            d.add_incoming(ir.Constant(i64, 0), pre)
            for a in accs:
                a.add_incoming(ir.Constant(f8, [0.0] * 8), pre)
            builder.cbranch(builder.icmp_signed("<", d, n), body, done)
            builder.position_at_end(body)

            def vload(p):  # type: ignore[no-untyped-def]
                return builder.load(builder.bitcast(builder.gep(p, [d]), f8.as_pointer()), align=4)

            xv = [vload(p) for p in xs]
            xav = [vload(p) for p in xas]
            yv = [vload(p) for p in ys]
            yav = yv if nonneg else [builder.call(fabs, [v]) for v in yv]
            new = []
            for t in range(nq_):
                for u in range(nr_):
                    num = builder.call(fabs, [builder.fsub(xv[t], yv[u])])
                    den = builder.fadd(xav[t], yav[u])
                    term = builder.fmul(num, builder.call(rcpf, [den])) if rcp else builder.fdiv(num, den)
                    new.append(builder.fadd(accs[t * nr_ + u], term))
            d.add_incoming(builder.add(d, ir.Constant(i64, 8)), builder.block)
            for a, v in zip(accs, new, strict=True):
                a.add_incoming(v, builder.block)
            builder.branch(head)
            builder.position_at_end(done)
            i32 = ir.IntType(32)
            outs = []
            for a in accs:
                v4 = builder.fadd(builder.shuffle_vector(a, a, ir.Constant(ir.VectorType(i32, 4), [0, 1, 2, 3])), builder.shuffle_vector(a, a, ir.Constant(ir.VectorType(i32, 4), [4, 5, 6, 7])))
                v2 = builder.fadd(builder.shuffle_vector(v4, v4, ir.Constant(ir.VectorType(i32, 2), [0, 1])), builder.shuffle_vector(v4, v4, ir.Constant(ir.VectorType(i32, 2), [2, 3])))
                outs.append(builder.fadd(builder.extract_element(v2, ir.Constant(i32, 0)), builder.extract_element(v2, ir.Constant(i32, 1))))
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return block


_USE_RCP = _avx_ok()  # False: IEEE division in the block (portable, slower)
_KERNELS: dict[str, object] = {}


def _kernels() -> dict[str, object]:
    if _KERNELS:
        return _KERNELS
    import numba as nb

    @nb.njit(inline="always")
    def _heap_push(hd: np.ndarray, hi: np.ndarray, n: int, cap: int, dist: float, idx: int) -> int:
        # max-heap on (dist, idx); returns new size
        if n < cap:
            j = n
            n += 1
        else:
            if dist > hd[0] or (dist == hd[0] and idx > hi[0]):
                return n
            # replace root and sift down
            j = 0
            while True:
                lft = 2 * j + 1
                if lft >= n:
                    break
                c = lft
                r = lft + 1
                if r < n and (hd[r] > hd[lft] or (hd[r] == hd[lft] and hi[r] > hi[lft])):
                    c = r
                if hd[c] > dist or (hd[c] == dist and hi[c] > idx):
                    hd[j] = hd[c]
                    hi[j] = hi[c]
                    j = c
                else:
                    break
            hd[j] = dist
            hi[j] = idx
            return n
        while j > 0:
            p = (j - 1) // 2
            if hd[p] < dist or (hd[p] == dist and hi[p] < idx):
                hd[j] = hd[p]
                hi[j] = hi[p]
                j = p
            else:
                break
        hd[j] = dist
        hi[j] = idx
        return n

    @nb.njit(inline="always")
    def _offer(hd: np.ndarray, hi: np.ndarray, sizes: np.ndarray, bound: np.ndarray, t: int, qi: int, cap: int, acc: float, j: int, grow: float) -> None:
        # one finished pair into the query's heap; a full heap tightens the bound
        sizes[qi] = _heap_push(hd[qi], hi[qi], sizes[qi], cap, acc, j)
        if sizes[qi] == cap:
            nb_ = hd[qi, 0] * grow
            if nb_ < bound[t]:
                bound[t] = nb_

    blk_nn = _make_block(4, 2, True, _USE_RCP)
    blk_sg = _make_block(4, 2, False, _USE_RCP)

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def scan(q: np.ndarray, qa: np.ndarray, r: np.ndarray, nonneg: bool, seed_bound: np.ndarray, cap: int, qb: int, rb: int, chunk: int, grow: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # Query blocks in parallel; inside, reference tiles x query quads x
        # reference pairs: a 4 x 2 register block (the intrinsic) accumulates
        # eight distances in one pass over a chunk of dimensions, and the
        # block stops once all eight pairs have exceeded their query's bound.
        # Every pair's float32 value (its partial sum if abandoned: a lower
        # bound) goes to `approx`, which the float64 certification uses.
        nq, dim = q.shape
        nr = r.shape[0]
        hd = np.full((nq, cap), np.inf, dtype=np.float32)
        hi = np.full((nq, cap), -1, dtype=np.int64)
        sizes = np.zeros(nq, dtype=np.int64)
        approx = np.empty((nq, nr), dtype=np.float32)
        nqb = (nq + qb - 1) // qb
        for b in nb.prange(nqb):
            q0 = b * qb
            q1 = min(nq, q0 + qb)
            m = q1 - q0
            bound = np.empty(m, dtype=np.float32)
            for t in range(m):
                bound[t] = seed_bound[q0 + t] * grow
            acc = np.zeros(8, dtype=np.float32)
            part = np.zeros(8, dtype=np.float32)
            lim = np.zeros(8, dtype=np.float32)
            dead = np.zeros(8, dtype=np.bool_)
            for r0 in range(0, nr, rb):
                r1 = min(nr, r0 + rb)
                for t0 in range(0, m, 4):
                    # a short last quad repeats its last query (offered once)
                    ta = (t0, min(t0 + 1, m - 1), min(t0 + 2, m - 1), min(t0 + 3, m - 1))
                    for j0 in range(r0, r1, 2):
                        j1 = min(j0 + 1, r1 - 1)
                        rows = (q0 + ta[0], q0 + ta[1], q0 + ta[2], q0 + ta[3], j0, j1)
                        for p in range(8):
                            acc[p] = 0.0
                            dead[p] = False
                            lim[p] = bound[ta[p // 2]]
                        s = 0
                        while s < dim:
                            e = min(dim, s + chunk)
                            n8 = (e - s) - (e - s) % 8
                            if nonneg:
                                v = blk_nn(q, qa, r, rows, s, n8)
                            else:
                                v = blk_sg(q, qa, r, rows, s, n8)
                            part[0] = v[0]
                            part[1] = v[1]
                            part[2] = v[2]
                            part[3] = v[3]
                            part[4] = v[4]
                            part[5] = v[5]
                            part[6] = v[6]
                            part[7] = v[7]
                            for d in range(s + n8, e):  # tail of a chunk (dim % 8)
                                for p in range(8):
                                    a = q[rows[p // 2], d]
                                    y = r[rows[4 + p % 2], d]
                                    part[p] += abs(a - y) / (qa[rows[p // 2], d] + abs(y))
                            alive = False
                            for p in range(8):
                                if not dead[p]:
                                    acc[p] += part[p]
                                    dead[p] = acc[p] > lim[p]
                                    alive = alive or not dead[p]
                            s = e
                            if not alive:
                                break
                        for tq in range(4):
                            if tq > 0 and ta[tq] == ta[tq - 1]:
                                continue
                            t = ta[tq]
                            for u in range(2):
                                j = j0 + u
                                if u == 1 and j1 == j0:
                                    continue
                                val = acc[2 * tq + u]
                                approx[q0 + t, j] = val
                                if not dead[2 * tq + u]:
                                    _offer(hd, hi, sizes, bound, t, q0 + t, cap, val, j, grow)
        return hd, hi, sizes, approx

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def exact_pairs(q: np.ndarray, r: np.ndarray, ids: np.ndarray) -> np.ndarray:
        # float64 re-scoring of chosen pairs; den + 1e-300 (a normal double)
        # makes 0/0 = 0 without a branch, and changes no other term (float32
        # inputs give den >= 1.4e-45 when it is not 0)
        nq, m = ids.shape
        out = np.full((nq, m), np.inf, dtype=np.float64)
        for i in nb.prange(nq):
            x = q[i]
            for c in range(m):
                j = ids[i, c]
                if j < 0:
                    continue
                y = r[j]
                acc = 0.0
                for d in range(x.shape[0]):
                    a = np.float64(x[d])
                    b = np.float64(y[d])
                    acc += abs(a - b) / (abs(a) + abs(b) + 1e-300)
                out[i, c] = acc
        return out

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def approx_pairs(q: np.ndarray, r: np.ndarray, ids: np.ndarray) -> np.ndarray:
        # the float32 scan formula on chosen pairs (for the seed bound)
        nq, m = ids.shape
        out = np.full((nq, m), np.inf, dtype=np.float32)
        tiny = np.float32(1e-30)
        for i in nb.prange(nq):
            x = q[i]
            for c in range(m):
                y = r[ids[i, c]]
                acc = np.float32(0.0)
                for d in range(x.shape[0]):
                    a = x[d]
                    b = y[d]
                    acc += abs(a - b) / (abs(a) + abs(b) + tiny)
                out[i, c] = acc
        return out

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def sampled(q: np.ndarray, r: np.ndarray, dims: np.ndarray) -> np.ndarray:
        nq = q.shape[0]
        nr = r.shape[0]
        m = dims.shape[0]
        qs = np.empty((nq, m), dtype=np.float32)
        rs = np.empty((nr, m), dtype=np.float32)
        for i in range(nq):
            for c in range(m):
                qs[i, c] = q[i, dims[c]]
        for j in nb.prange(nr):
            for c in range(m):
                rs[j, c] = r[j, dims[c]]
        out = np.empty((nq, nr), dtype=np.float32)
        for i in nb.prange(nq):
            for j in range(nr):
                acc = np.float32(0.0)
                for c in range(m):
                    a = qs[i, c]
                    b = rs[j, c]
                    acc += abs(a - b) / max(abs(a) + abs(b), np.float32(1e-30))
                out[i, j] = acc
        return out

    _KERNELS.update(scan=scan, exact_pairs=exact_pairs, approx_pairs=approx_pairs, sampled=sampled)
    return _KERNELS


def canberra_knn(
    queries: np.ndarray,
    refs: np.ndarray,
    k: int,
    pad: int | None = None,
    seed_dims: int = 128,
    query_block: int = 16,
    ref_block: int = 16,
    batch: int = 512,
    ref_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (distances, ids) of the k nearest references, nearest first, ties to the lower id.

    Identical to :func:`canberra_knn_reference` (tested); see the module
    docstring for the seed / scan / certify scheme. Distances are float64.
    Queries are processed ``batch`` at a time (the seed pass holds a
    (batch, N) float32 matrix); each batch is split into query blocks of at
    most ``query_block`` (smaller when needed to give every thread work).
    ``ref_range``: (min, max) of ``refs`` if known (saves a pass over them):
    references >= 0 skip ``|y|`` in the scan; values beyond +-1e37 (where
    ``|x - y|`` or ``|x| + |y|`` could overflow float32) take the numpy path.
    """
    if queries.shape[0] > batch:
        if ref_range is None and refs.size:
            ref_range = (float(np.min(refs)), float(np.max(refs)))
        parts = [canberra_knn(queries[s : s + batch], refs, k, pad, seed_dims, query_block, ref_block, batch, ref_range) for s in range(0, queries.shape[0], batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    q = np.ascontiguousarray(queries, dtype=np.float32)
    r = np.ascontiguousarray(refs, dtype=np.float32)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"queries {q.shape} and references {r.shape} do not match")
    if not np.isfinite(q).all():
        raise ValueError("Canberra queries contain NaN or inf")
    n = r.shape[0]
    k = min(k, n)
    if q.shape[0] == 0 or k == 0:
        return np.zeros((q.shape[0], k)), np.zeros((q.shape[0], k), dtype=np.int64)
    try:
        kern = _kernels()
    except ImportError:  # pragma: no cover - numba is a dependency
        log.warning("numba not available; Canberra falls back to the slow numpy path")
        return canberra_knn_reference(q, r, k)
    lo, hi_ = ref_range if ref_range is not None else (float(r.min()), float(r.max()))
    if max(-lo, hi_, float(np.abs(q).max())) > 1e37:
        return canberra_knn_reference(q, r, k)
    cap = min(n, k + (pad if pad is not None else max(8, k // 8)))
    # 1. seed bound from an approximate pass on a sample of dimensions
    dim = q.shape[1]
    if dim > 2 * seed_dims and n > 4 * cap:
        dims = np.linspace(0, dim - 1, seed_dims).astype(np.int64)
        approx = kern["sampled"](q, r, dims)  # type: ignore[operator]
        cand = np.argpartition(approx, k - 1, axis=1)[:, :k]
        # any k references bound the k-th distance from above; float32 here,
        # the scan widens every bound by (1 + 4 eps) against rounding
        seed = kern["approx_pairs"](q, r, cand).max(axis=1)  # type: ignore[operator]
    else:
        seed = np.full(q.shape[0], np.inf, dtype=np.float32)
    # 2. fused scan with early abandoning; float32 value of every pair
    import numba

    eps = scan_eps(q.shape[1], CHUNK, _USE_RCP)
    qa = np.abs(q) + np.float32(1e-30)  # 0/0 terms count 0; stays a normal float32
    nonneg = lo >= 0
    per_thread = -(-q.shape[0] // (4 * numba.get_num_threads()))
    qb = max(4, min(query_block, per_thread + (-per_thread) % 4))
    grow = 1.0 + 4.0 * eps
    hd, hi, sizes, approx = kern["scan"](q, qa, r, nonneg, seed.astype(np.float32), cap, qb, ref_block, CHUNK, grow)  # type: ignore[operator]
    # 3. certify in float64: re-score the candidates; T = their k-th distance
    # bounds the true k-th from above, and a reference can only beat T if its
    # float32 value (a sum with relative error <= eps, or a lower bound) is
    # <= T (1 + eps): those are re-scored too, so the result is exact
    exact = kern["exact_pairs"](q, r, hi)  # type: ignore[operator]
    order = np.lexsort((np.where(hi < 0, np.iinfo(np.int64).max, hi), exact), axis=-1)
    d_out = np.take_along_axis(exact, order, axis=1)[:, :k]
    i_out = np.take_along_axis(hi, order, axis=1)[:, :k]
    kth = np.where(sizes >= k, d_out[:, k - 1], np.inf)
    thr = np.nextafter((kth * (1.0 + eps)).astype(np.float32), np.float32(np.inf))
    mask = approx <= thr[:, None]
    in_heap = np.take_along_axis(approx, np.maximum(hi, 0), axis=1) <= thr[:, None]
    extra = mask.sum(axis=1) > (in_heap & (hi >= 0)).sum(axis=1)
    if extra.any():
        log.debug("canberra: %d of %d queries re-score extra float32-close references", int(extra.sum()), len(extra))
        rows = np.flatnonzero(extra)
        lists = [np.union1d(np.flatnonzero(mask[i]), hi[i][hi[i] >= 0]) for i in rows]
        ids = np.full((len(rows), max(len(v) for v in lists)), -1, dtype=np.int64)
        for c, v in enumerate(lists):
            ids[c, : len(v)] = v
        ex = kern["exact_pairs"](q[rows], r, ids)  # type: ignore[operator]
        o = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), ex), axis=-1)[:, :k]
        d_out[rows], i_out[rows] = np.take_along_axis(ex, o, axis=1), np.take_along_axis(ids, o, axis=1)
    return d_out, i_out.astype(np.int64)


def contribution_order(refs: np.ndarray, n_pairs: int = 512, seed: int = 0) -> np.ndarray:
    """Dimensions sorted by their mean Canberra term over random reference pairs, largest first.

    Canberra is a sum over dimensions, so any order gives the same distance;
    scanning the dimensions that contribute most first makes partial sums
    cross the k-th-neighbour bound sooner (earlier exact abandoning).
    """
    r = np.asarray(refs, dtype=np.float32)
    n = r.shape[0]
    if n < 2:
        return np.arange(r.shape[1])
    rng = np.random.default_rng(seed)
    a = r[rng.integers(0, n, n_pairs)].astype(np.float64)
    b = r[rng.integers(0, n, n_pairs)].astype(np.float64)
    den = np.abs(a) + np.abs(b)
    t = np.divide(np.abs(a - b), den, out=np.zeros_like(den), where=den > 0).mean(axis=0)
    return np.argsort(-t, kind="stable")


class CanberraSearch:
    """Exact Canberra k-NN over fixed references with dimensions in contribution order."""

    def __init__(self, refs: np.ndarray):
        r = np.ascontiguousarray(refs, dtype=np.float32)
        if not np.isfinite(r).all():
            raise ValueError("Canberra references contain NaN or inf")
        self.order = contribution_order(r)
        self.refs = np.ascontiguousarray(r[:, self.order])
        self.range = (float(r.min()), float(r.max())) if r.size else (0.0, 0.0)

    def __len__(self) -> int:
        return int(self.refs.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances float64, ids int64), identical to :func:`canberra_knn_reference`."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32)[:, self.order])
        return canberra_knn(q, self.refs, k, ref_range=self.range)


__all__ = ["CanberraSearch", "canberra_distances", "canberra_knn", "canberra_knn_reference", "contribution_order"]
