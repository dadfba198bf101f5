"""A batched primal-dual interior-point solver in torch for any declared polytope (``backend="torch"``).

Solves, for every row of ``θ = u / t``,

    min_z  −θᵀx + Σ_i f(x_i) + ε/2‖aux‖²   s.t.  A z = b,  G z ≤ h,  L ≤ z ≤ U,   z = (x, aux)

from the polytope's canonical form: variables that are constant on P are eliminated (outputs such
as an arborescence's diagonal, auxiliary flows on arcs into a flow formulation's root: kept, they
would be degenerate complementarity pairs, the worst-conditioned part of the Newton system),
inequality rows left with one variable become bounds, dependent equalities are removed, the
finite ends of an entropy's domain kept as barrier bounds, free auxiliary variables given their
implied bounds (bound propagation, two LPs where it leaves a side open; once), and a tiny
proximal term ε on the auxiliary variables selects a unique aux among optimal ones in
degenerate formulations (it moves x by O(ε) = 1e-10).

Each iteration is a Mehrotra predictor-corrector step on the perturbed KKT conditions (an
affine-scaling direction sets the centering, a second-order corrected direction is taken, both
from one factorization), damped to stay interior, on the rows still running only. With the diagonal
``D = f'' ⊕ ε + Z_L/(z − L) + Z_U/(U − z)`` and ``Σ = λ/s``, the matrix ``M = D + Gᵀ Σ G`` is
block diagonal once the variables are grouped by the inequality rows they share (one small
block per arc in the flow formulations, a *star* (capacity rows f ≤ y sharing y) inverted in
closed form; diagonal when there are none; otherwise Cholesky per block); the equality Schur
complement ``S = A M⁻¹ Aᵀ`` is assembled from a sparsity pattern shared by the whole batch.
Equality rows whose variables lie in disjoint blocks (``x = C y`` in flow formulations, the row
sums of a Birkhoff polytope) give a diagonal block of S and are eliminated in closed form; the
rest is Cholesky-factored with a relative ridge (and refined against the exact operator in the
backward pass). A row has converged when its KKT residual is below ``tol``: the dual residual
relative to ``1 + max|θ|`` (over the allowed coordinates: forbidden ones, ``-inf`` in ``u``,
reach the solver as a huge negative stand-in with their mask, and start near 0; in rows with
entries far above the others, per coordinate, relative to the terms of its own residual), the primal
residuals, 1000× the mean complementarity and, once those are within ``accept``, 100× the
largest complementarity pair whose slack and multiplier are still within 1e4 of each other
(unresolved: neither active nor inactive yet). A best-iterate safeguard and a stall test end
each row. A row that stalls above the accepted residual (a degenerate problem: weakly active
constraints, whose slacks fall only like sqrt(μ)) gets an active-set Newton polish from its
best iterate, kept if its KKT residual is smaller; so does a converged row with a pair still
unresolved whose slack and multiplier (relative to θ) both exceed 1e-8 (a constraint active with
a small multiplier, or tied utilities under the quadratic: x on a bound with a zero multiplier),
except under an entropy in formulations with auxiliary variables (flows), whose flows are not
unique.

The backward pass is implicit differentiation of the active-set reduced KKT system at the
solution (constraints classified by their slack, or by a multiplier 1e4× their slack, enforced
by a penalty): one more block solve, no unrolling. Per-sample convergence (status, KKT
residual, iterations) is returned by :func:`solve_torch`; ``relax(..., backend="torch")`` warns
(or raises, ``on_failure="raise"``) naming the batch indices that did not converge, and returns
the others' solutions unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph
import torch

from ._autograd import first_order_guard
from .canonical import CanonicalForm, entry_name
from ._forbidden import rows_on, solve_again, tame_extremes
from .errors import InputError, PolytopeError, SolverError, warn_user
from .polytope import Polytope
from .regularizers import Regularizer


@dataclass
class StandardForm:
    """``A z = b, G z ≤ h, L ≤ z ≤ U`` in numpy (A and G sparse, CSR: the flow formulations have
    two or three nonzeros a row; dense, G of spanning trees on 23 vertices took 1.06 GB), with the
    block structure of ``Gᵀ Σ G``.

    ``z`` holds the free output coordinates first (``x[free] = z[:, :d]``), then auxiliary
    variables; variables that are constant on P (``x_j`` = 0 on the diagonal of an
    arborescence, say, or a flow on an arc into the root) are eliminated, the outputs among them
    restored from ``fixed_values``. Variables that share an
    inequality row are grouped into ``blocks`` (connected components): the Newton matrix
    ``D + Gᵀ Σ G`` is block diagonal in that grouping (for the flow formulations: one small block
    per arc), so it is inverted block by block.
    """

    A: sp.csr_matrix       # (m, n) independent equality rows
    b: np.ndarray
    G: sp.csr_matrix       # (p, n) inequality rows with more than one variable
    h: np.ndarray
    L: np.ndarray          # (n,)
    U: np.ndarray
    d: int                 # number of free output coordinates
    free: np.ndarray
    fixed: np.ndarray
    fixed_values: np.ndarray
    domain: tuple[float, float]
    blocks: np.ndarray     # (nb, s) variable indices, padded with n
    gpairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # flat position in (nb·s·s), row of G, value product
    spairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # position in [S22, S21, diag S11], in (nb·s·s), coefficient
    domL: np.ndarray       # (n,) bounds that are only the regularizer's open domain (never active)
    domU: np.ndarray
    structure: str         # 'diagonal', 'star' or 'dense': how the blocks are inverted
    coef: tuple[np.ndarray, np.ndarray, np.ndarray]  # 'star': leaf rows and coefficients α, β
    m1: int                # the first m1 rows of A have a diagonal block in A M⁻¹ Aᵀ
    layout: tuple[int, tuple[tuple[int, int], ...]] | None  # (n0, ((stars, size), ...)): n0 singletons, then stars, contiguous
    cache: dict
    lines: list[np.ndarray] = field(default_factory=list)  # (rows, size) free outputs of 0/1 equality rows, padded with d
    band: int = 0          # > 0: the reduced Schur complement is block tridiagonal in blocks of this size
    band_cols: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # _band's column lists of the blocks (and pairs)


def _sparse_rows(M: sp.spmatrix) -> sp.csr_matrix:
    """``M`` as CSR without explicit zeros, column indices sorted within each row."""
    M = sp.csr_matrix(M, dtype=float, copy=True)
    M.eliminate_zeros()
    M.sort_indices()
    return M


def _row_cols(M: sp.csr_matrix, r: int) -> np.ndarray:
    return M.indices[M.indptr[r]: M.indptr[r + 1]]


def _block_structure(G: sp.csr_matrix, groups: list[list[int]]) -> tuple[str, list[list[int]], list[list[int]]]:
    """Classify the blocks of ``D + Gᵀ Σ G`` for a closed-form inverse.

    * ``'diagonal'``: no inequality rows;
    * ``'star'``: in every block, each row has two variables, one of them the block's *hub*
      (shared by all its rows) and the other a *leaf* in no other row (the capacity rows
      ``f ≤ y`` of flow formulations); the hub is moved to position 0 of its group;
    * ``'dense'``: anything else (block Cholesky).

    Returns the structure, the (reordered) groups and, per group, the rows of its leaves in
    order (``'star'``).
    """
    if G.shape[0] == 0:
        return "diagonal", groups, [[] for _ in groups]
    nz = [_row_cols(G, r) for r in range(G.shape[0])]
    rows_of: dict[int, list[int]] = {}
    for r, cols in enumerate(nz):
        for c in cols.tolist():
            rows_of.setdefault(c, []).append(r)
    block_rows = [sorted({r for j in g for r in rows_of.get(j, [])}) for g in groups]
    star_groups: list[list[int]] = []
    leaf_rows: list[list[int]] = []
    for g, rs in zip(groups, block_rows):
        if not rs:
            star_groups.append(g)
            leaf_rows.append([])
            continue
        if any(len(nz[r]) != 2 for r in rs):
            return "dense", groups, block_rows
        common = set.intersection(*(set(nz[r].tolist()) for r in rs))
        if not common:  # rows in a chain, say: no variable shared by all of them
            return "dense", groups, block_rows
        hub = g[0] if g[0] in common else min(common)
        leaves = [int(c) for r in rs for c in nz[r] if c != hub]
        if len(set(leaves)) != len(leaves) or len(leaves) + 1 != len(g):
            return "dense", groups, block_rows
        star_groups.append([hub] + leaves)
        leaf_rows.append(list(rs))
    return "star", star_groups, leaf_rows


def _offsets(counts: np.ndarray) -> np.ndarray:
    """``[0, 1, ..., counts[0] − 1, 0, 1, ..., counts[1] − 1, ...]``."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)


def _pairs_within(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs within consecutive segments of the given lengths (the nonzeros of
    each row of a CSR matrix, say), segment by segment, first element major: ``(segment, i1,
    i2)``, with ``i1, i2`` positions in the concatenation of the segments."""
    counts = np.asarray(counts, dtype=np.int64)
    seg = np.repeat(np.arange(counts.size, dtype=np.int64), counts * counts)
    q, k, start = _offsets(counts * counts), counts[seg], (np.cumsum(counts) - counts)[seg]
    return seg, start + q // k, start + q % k


def _independent_rows(A: sp.csr_matrix) -> np.ndarray:
    """The rows of ``A`` that column-pivoted QR of ``Aᵀ`` keeps (pivots above 1e-9 of the
    largest), sorted: independent rows that span all of them. Rows in different connected
    components (rows linked through shared columns) are orthogonal, so the QR runs per
    component, on small dense blocks: the flow formulations split into one per commodity
    (spanning trees on 32 vertices: 33 QRs in 0.07 s, where one QR of the dense 30 318 × 1 488
    Aᵀ took 11.7 s). Which of equivalent dependent rows is dropped can differ from one QR of
    all of Aᵀ (ties between equal pivots are broken differently). A component of more than
    :data:`_QR_MAX_ROWS` rows is settled exactly by :func:`_network_rows` where its structure
    allows (the single component of a sequence's flow: correlated k-subsets)."""
    m = A.shape[0]
    pattern = sp.csr_matrix((np.ones(A.nnz), A.indices, A.indptr), shape=A.shape)
    _, label = sp.csgraph.connected_components(pattern @ pattern.T, directed=False)
    pivots: list[tuple[np.ndarray, np.ndarray]] = []  # per component: its rows in pivot order, |R_ii|
    exact: list[np.ndarray] = []  # components settled by _network_rows
    for c in range(int(label.max()) + 1 if m else 0):
        rows = np.flatnonzero(label == c)
        block = A[rows]
        if len(rows) > _QR_MAX_ROWS:
            got = _network_rows(block)
            if got is not None:
                exact.append(rows[got])
                continue
        cols = np.unique(block.indices)
        R, piv = scipy.linalg.qr(block[:, cols].toarray().T, mode="r", pivoting=True)
        pivots.append((rows[piv], np.abs(np.diag(R))))
    largest = max((float(dg.max()) for _, dg in pivots if dg.size), default=0.0)
    keep = [rows[: int((dg > 1e-9 * max(1.0, largest)).sum())] for rows, dg in pivots] + exact
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


# components of more rows than this try _network_rows before the dense QR (which took 1.9 s at
# 2 101 rows, 17 s at 4 401 and 146 s at 9 001: correlated k-subsets, one component)
_QR_MAX_ROWS = 500


def _network_rows(A: sp.csr_matrix) -> np.ndarray | None:
    """Independent rows of ``A`` spanning all of them, exactly and in O(nnz), where its structure
    allows; else None. A row with a column no other row has is independent of the others, and
    taking it out leaves their dependencies as they were: such rows are kept and taken out until
    none is left (the rows ``x = M f`` of a flow formulation). If every column of what is left
    has two nonzeros ``v, −v`` (flow conservation: an incidence matrix, columns scaled), its rank
    is its number of rows less its number of connected components, and all rows but the last of
    each component are kept. None when what is left has another column."""
    A = sp.csr_matrix(A, copy=True)  # structural nonzeros only (the caller's matrix untouched)
    A.eliminate_zeros()
    m = A.shape[0]
    Ac = sp.csc_matrix(A)
    Ac.sort_indices()
    count = np.diff(Ac.indptr)
    alive = np.ones(m, dtype=bool)
    kept: list[int] = []
    rows_of = [Ac.indices[Ac.indptr[j]: Ac.indptr[j + 1]] for j in range(A.shape[1])]
    cols_of = [A.indices[A.indptr[r]: A.indptr[r + 1]] for r in range(m)]
    stack = [r for r in range(m) if (count[cols_of[r]] == 1).any()]
    while stack:
        r = stack.pop()
        if not alive[r]:  # (a column of count 1 stays so until its row is taken out)
            continue
        alive[r] = False
        kept.append(r)
        count[cols_of[r]] -= 1
        for j in cols_of[r]:
            if count[j] == 1:
                stack.extend(q for q in rows_of[j].tolist() if alive[q])
    core = np.flatnonzero(alive)
    if core.size:
        C = sp.csc_matrix(A[core])
        C.sort_indices()
        nnz = np.diff(C.indptr)
        if np.any((nnz != 0) & (nnz != 2)):
            return None
        two = np.flatnonzero(nnz == 2)
        first, second = C.data[C.indptr[two]], C.data[C.indptr[two] + 1]
        if np.any(np.abs(first + second) > 1e-12 * np.abs(first)):
            return None
        edges = sp.csr_matrix((np.ones(two.size), (C.indices[C.indptr[two]], C.indices[C.indptr[two] + 1])),
                              shape=(core.size, core.size))
        _, comp = sp.csgraph.connected_components(edges, directed=False)
        last = np.zeros(int(comp.max()) + 1, dtype=np.int64)
        np.maximum.at(last, comp, np.arange(core.size))
        drop = np.zeros(core.size, dtype=bool)
        drop[last] = True
        kept.extend(core[~drop].tolist())
    return np.sort(np.asarray(kept, dtype=np.int64))


def standard_form(P: Polytope, reg: Regularizer) -> StandardForm:
    """Build (once per polytope and regularizer) the solver's standard form."""
    key = ("torch_form", reg)
    if key in P.cache:
        return P.cache[key]
    form = P.form
    d, N = form.out_size, form.num_z
    A = _sparse_rows(form.A_eq)
    b = form.b_eq.copy()
    G = _sparse_rows(form.A_ub)
    h = form.b_ub.copy()
    L, U = form.lb.copy(), form.ub.copy()
    # the ends of the regularizer's domain become barrier bounds too (entropies' gradients alone
    # would let infeasible early iterates race to the edge); they are never active at the solution
    domL = np.zeros(N, dtype=bool)
    domU = np.zeros(N, dtype=bool)
    if reg.open_domain and math.isfinite(reg.domain[0]):
        domL[:d] = L[:d] <= reg.domain[0]
        L[:d] = np.maximum(L[:d], reg.domain[0])
    if reg.open_domain and math.isfinite(reg.domain[1]):
        domU[:d] = U[:d] >= reg.domain[1]
        U[:d] = np.minimum(U[:d], reg.domain[1])
    # eliminate variables constant on P (output coordinates such as the diagonal of an
    # arborescence; auxiliary ones such as the flows on arcs into a flow formulation's root, 98
    # of 476 variables for spanning trees on 8 vertices), and variables with equal bounds. Left in,
    # a constant variable at a bound is a degenerate complementarity pair (slack and multiplier
    # both tending to 0), the worst-conditioned part of the Newton system
    cmask, cval = P.lp.constant_variables()  # LPs, once per polytope
    const = np.flatnonzero(cmask)
    fixed_x = const[const < d]
    # auxiliary variables that no constraint or bound reads (declared, not yet used) do not
    # matter: fixed at 0 (the generic path leaves them out too)
    read = (np.diff(sp.csc_matrix(form.A_eq).indptr) > 0) | (np.diff(sp.csc_matrix(form.A_ub).indptr) > 0)
    unread = np.flatnonzero(~read & ~np.isfinite(L) & ~np.isfinite(U))
    unread = unread[unread >= d]
    fixed = np.union1d(np.union1d(const, unread), np.flatnonzero(np.abs(U - L) <= 1e-12))
    vals = L.copy()
    vals[unread] = 0.0
    vals[const] = cval[const]
    vals = vals[fixed]
    b = b - A[:, fixed] @ vals
    h = h - G[:, fixed] @ vals
    keep = np.setdiff1d(np.arange(N), fixed)
    A, G = _sparse_rows(A[:, keep]), _sparse_rows(G[:, keep])
    L, U, domL, domU = L[keep], U[keep], domL[keep], domU[keep]
    free = np.setdiff1d(np.arange(d), fixed_x)
    dfree, n = free.size, keep.size
    nz_a = np.diff(A.indptr) > 0
    if np.any(~nz_a & (np.abs(b) > 1e-9)):  # pragma: no cover - P is non-empty
        raise PolytopeError(f"{P!r}: inconsistent equalities after eliminating fixed variables")
    A, b = A[nz_a], b[nz_a]
    if A.shape[0]:
        sel = _independent_rows(A)
        A, b = A[sel], b[sel]
    nz_g = np.diff(G.indptr) > 0
    G, h = G[nz_g], h[nz_g]
    # rows left with one variable (a capacity f ≤ y whose flow is constant) are bounds
    single = np.diff(G.indptr) == 1
    if single.any():
        at = G.indptr[:-1][single]
        j, a = G.indices[at], G.data[at]
        bound = h[single] / a
        upper, lower = np.full(n, np.inf), np.full(n, -np.inf)
        np.minimum.at(upper, j[a > 0], bound[a > 0])
        np.maximum.at(lower, j[a < 0], bound[a < 0])
        domU[upper < U], domL[lower > L] = False, False
        U, L = np.minimum(U, upper), np.maximum(L, lower)
    G, h = G[~single], h[~single]
    # every variable needs curvature or a bound: give free auxiliary variables their implied
    # bounds, from bound propagation (y ≥ 0 from 0 ≤ f ≤ y, then y ≤ 1 from Σ_in y = 1, in
    # milliseconds) or, where that leaves a side open, from their range over P (two LPs: 0.37 s
    # each for the 38 such arcs of spanning trees on 20 vertices)
    implied = None
    for jj in range(dfree, n):
        if not (np.isfinite(L[jj]) or np.isfinite(U[jj])):
            if implied is None:
                implied = form.implied_bounds()
            lo, hi = implied[0][keep[jj]], implied[1][keep[jj]]
            if not (np.isfinite(lo) and np.isfinite(hi)):
                lo, hi = P.lp.z_range(int(keep[jj]))
            if not (np.isfinite(lo) or np.isfinite(hi)):
                raise PolytopeError(
                    f"auxiliary variable {entry_name(int(keep[jj]), form.layout)} of {P!r} is unbounded; the torch "
                    "solver needs bounds on auxiliary variables (add them to the config), or use backend='generic'"
                )
            L[jj], U[jj] = lo - 1.0, hi + 1.0  # strictly redundant: never active at the solution
    # blocks: connected components of the variables through the inequality rows, in the order of
    # their smallest variable
    rnnz = np.diff(G.indptr)
    first = np.repeat(G.indices[G.indptr[:-1][rnnz > 0]], rnnz[rnnz > 0])
    link = sp.coo_matrix((np.ones(first.size), (first, G.indices)), shape=(n, n))
    _, label = sp.csgraph.connected_components(link, directed=False)
    _, lead = np.unique(label, return_index=True)
    rank_of = np.empty(lead.size, dtype=np.int64)
    rank_of[np.argsort(lead)] = np.arange(lead.size)
    member = np.argsort(rank_of[label], kind="stable")
    groups = [g.tolist() for g in np.split(member, np.cumsum(np.bincount(rank_of[label]))[:-1])] if n else []
    structure, groups, leaf_rows = _block_structure(G, groups)
    # Contiguous layout for stars whose outputs are all singletons (the flow formulations):
    # variables reordered as [singletons (x first), stars of the smallest size (hub, leaves), ...,
    # stars of the largest size], so that M⁻¹ v works on one (B, stars, s) view per star size
    # instead of gathering and scattering
    layout = None
    if structure == "star":
        singles = sorted(g[0] for g in groups if len(g) == 1)
        stars = sorted(((g, r) for g, r in zip(groups, leaf_rows) if len(g) > 1), key=lambda gr: len(gr[0]))
        if stars and singles[:dfree] == list(range(dfree)):
            perm = np.asarray(singles + [j for g, _ in stars for j in g], dtype=np.int64)
            A, G = _sparse_rows(A[:, perm]), _sparse_rows(G[:, perm])
            L, U, domL, domU = L[perm], U[perm], domL[perm], domU[perm]
            n0 = len(singles)
            groups, leaf_rows = [[i] for i in range(n0)], [[] for _ in range(n0)]
            segments: list[tuple[int, int]] = []  # (number of stars, star size), in order
            start = n0
            for g, leaves in stars:
                if segments and segments[-1][1] == len(g):
                    segments[-1] = (segments[-1][0] + 1, len(g))
                else:
                    segments.append((1, len(g)))
                groups.append(list(range(start, start + len(g))))
                leaf_rows.append(leaves)
                start += len(g)
            layout = (n0, tuple(segments))
    size = max(len(g) for g in groups) if groups else 1
    blocks = np.full((len(groups), size), n, dtype=np.int64)
    where = np.zeros((n, 2), dtype=np.int64)
    for bi, g in enumerate(groups):
        blocks[bi, : len(g)] = g
        where[g, 0] = bi
        where[g, 1] = np.arange(len(g))
    # Equality rows whose variables lie in pairwise disjoint blocks (x = C y of a flow formulation,
    # the row sums of a Birkhoff polytope) have a diagonal block in S = A M⁻¹ Aᵀ: they come first
    # (m1 of them) and are eliminated in closed form, so only the Schur complement of the other
    # m2 rows is factored. Greedy, rows touching the fewest other rows first.
    m = A.shape[0]
    row_blocks = [set(where[_row_cols(A, r), 0].tolist()) for r in range(m)]
    rows_at: dict[int, set[int]] = {}
    for r, bs in enumerate(row_blocks):
        for bi in bs:
            rows_at.setdefault(bi, set()).add(r)
    degree = [len(set().union(*(rows_at[bi] for bi in bs))) if bs else 0 for bs in row_blocks]
    claimed: set[int] = set()
    diag_rows = []
    for r in sorted(range(m), key=lambda r: (degree[r], r)):
        if not (row_blocks[r] & claimed):
            diag_rows.append(r)
            claimed |= row_blocks[r]
    diag_rows.sort()  # their order in A, which the band's column lists (diagonal rows) index
    rest = sorted(set(range(m)) - set(diag_rows))
    m1 = len(diag_rows)
    m2 = m - m1
    band = _band(row_blocks, diag_rows, rest, len(groups))
    if band:  # the other rows in a banded order
        rest = [rest[i] for i in band[1]]
    order = diag_rows + rest
    A, b = A[order], b[order]
    w = band[0] if band else 0
    # the products G[r, c1] G[r, c2] of every row's nonzeros, at their place in the blocks (nb·s·s)
    row, e1, e2 = _pairs_within(np.diff(G.indptr))
    c1, c2 = G.indices[e1], G.indices[e2]
    gblock = where[G.indices[G.indptr[row]], 0]
    gpairs = ((gblock * size + where[c1, 1]) * size + where[c2, 1], row, G.data[e1] * G.data[e2])
    # S = A M⁻¹ Aᵀ = Σ_blocks A[:, block] M_b⁻¹ A[:, block]ᵀ, assembled from the nonzeros of A
    # into [S22 (m2·m2), S21 (m2·m1), diagonal of S11 (m1)] (S12 = S21ᵀ and the zero
    # off-diagonal of S11 are not stored); the entries of a block are its columns' nonzeros,
    # column by column
    Ac = sp.csc_matrix(A)
    Ac.sort_indices()
    col = blocks.ravel()
    col = col[col < n]
    cnt = np.diff(Ac.indptr)[col]
    ent = np.repeat(Ac.indptr[col].astype(np.int64), cnt) + _offsets(cnt)
    eblock, epos = where[np.repeat(col, cnt), 0], where[np.repeat(col, cnt), 1]
    er, ev = Ac.indices[ent].astype(np.int64), Ac.data[ent]
    _, i1, i2 = _pairs_within(np.bincount(eblock, minlength=len(groups)))
    r1, r2 = er[i1], er[i2]
    if np.any((r1 < m1) & (r2 < m1) & (r1 != r2)):  # pragma: no cover - the rows were chosen in disjoint blocks
        raise PolytopeError("internal error: rows of the diagonal block share a block")
    if band:  # S22 as [diagonal blocks (nk·w·w), blocks below them (row block k, column block k − 1)]
        nk = -(-m2 // w)
        p1, p2 = r1 - m1, r2 - m1
        k1, k2 = p1 // w, p2 // w
        in22 = np.where(k1 == k2, k1 * w * w, nk * w * w + (k1 - 1) * w * w) + (p1 % w) * w + p2 % w
        use22 = k1 >= k2
        # S21 by blocks of rows, (nk, w, c): row p of S21 keeps the columns of its block's list
        c1 = band[2][0]
        cw = c1.shape[1]
        listed = (np.arange(nk)[:, None] * (m1 + 1) + c1).ravel()  # sorted: each list sorted, padded with m1
        sought = np.where((r1 >= m1) & (r2 < m1), (p1 // w) * (m1 + 1) + r2, 0)
        at = np.minimum(np.searchsorted(listed, sought), listed.size - 1)
        if np.any((r1 >= m1) & (r2 < m1) & (listed[at] != sought)):  # pragma: no cover - the lists hold every row met
            raise PolytopeError("internal error: a diagonal row missing from its block's column list")
        in21 = p1 * cw + at - (p1 // w) * cw
    else:
        in22 = (r1 - m1) * m2 + (r2 - m1)
        use22 = np.ones(len(r1), dtype=bool)
        cw, in21 = m1, (r1 - m1) * m1 + r2
    s22, s21 = _schur_parts(m, m1, w, cw)
    pos = np.where(r1 >= m1, np.where(r2 >= m1, in22, s22 + in21), s22 + s21 + r1)
    use = np.where(r1 >= m1, np.where(r2 >= m1, use22, True), r2 < m1)
    sidx = (eblock[i1] * size + epos[i1]) * size + epos[i2]
    spairs = (pos[use], sidx[use], (ev[i1] * ev[i2])[use])
    # per-block coefficients for the closed-form block inverses
    p_rows = G.shape[0]
    coef: tuple[np.ndarray, np.ndarray, np.ndarray]
    if structure == "star":  # leaf l of block b sits in row leaf_row[b, l] with the hub (position 0)
        lrow = np.full((len(groups), size - 1), p_rows, dtype=np.int64)
        leaf = np.full((len(groups), size - 1), -1, dtype=np.int64)
        for bi, g in enumerate(groups):
            lrow[bi, : len(g) - 1] = leaf_rows[bi]
            leaf[bi, : len(g) - 1] = g[1:]
        alpha = np.zeros((len(groups), size - 1))
        beta = np.zeros((len(groups), size - 1))
        bi_, li_ = np.nonzero(leaf >= 0)
        at = G.indptr[lrow[bi_, li_]]  # the row's two nonzeros: at and at + 1
        leaf_first = G.indices[at] == leaf[bi_, li_]
        alpha[bi_, li_] = np.where(leaf_first, G.data[at], G.data[at + 1])
        beta[bi_, li_] = np.where(leaf_first, G.data[at + 1], G.data[at])
        coef = (lrow, alpha, beta)
    else:
        coef = (np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    sf = StandardForm(A, b, G, h, L, U, dfree, free, fixed_x, cval[fixed_x],
                      reg.domain if reg.open_domain else (-math.inf, math.inf), blocks, gpairs, spairs,
                      domL, domU, structure, coef, m1, layout, {}, _offset_lines(form, free), w,
                      band[2] if band else None)
    P.cache[key] = sf
    return sf


def _offset_lines(form: CanonicalForm, free: np.ndarray) -> list[np.ndarray]:
    """The equality rows ``Σ_{j∈S} x_j = b`` on the outputs alone (the rows and columns of a
    Birkhoff polytope, the rows of a matching, Σx = k), as the positions of S among the free
    outputs, grouped into sets of pairwise disjoint rows, each an array ``(rows, size)`` padded
    with ``len(free)``. ``θ − λ·1_S`` is the same problem for every λ (:func:`_remove_offsets`)."""
    d = free.size
    pos = np.full(form.out_size, -1, dtype=np.int64)
    pos[free] = np.arange(d)
    A = form.A_eq.tocsr()
    lines: list[np.ndarray] = []
    for r in range(A.shape[0]):
        cols, vals = A.indices[A.indptr[r]: A.indptr[r + 1]], A.data[A.indptr[r]: A.indptr[r + 1]]
        if cols.size == 0 or cols.max() >= form.out_size or not np.all(vals == vals[0]):
            continue
        f = np.unique(pos[cols][pos[cols] >= 0])
        if f.size >= 2 and not any(np.array_equal(f, g) for g in lines):
            lines.append(f)
    groups: list[list[np.ndarray]] = []
    used: list[set[int]] = []
    for f in lines:
        for g, u in zip(groups, used):
            if u.isdisjoint(f.tolist()):
                g.append(f)
                u.update(f.tolist())
                break
        else:
            groups.append([f])
            used.append(set(f.tolist()))
    out = []
    for g in groups:
        idx = np.full((len(g), max(f.size for f in g)), d, dtype=np.int64)
        for i, f in enumerate(g):
            idx[i, : f.size] = f
        out.append(idx)
    return out


def _remove_offsets(theta: torch.Tensor, sf: StandardForm, exclude: torch.Tensor | None) -> torch.Tensor:
    """``θ − Σ_S λ_S 1_S`` over the equality rows S of :func:`_offset_lines` (the same problem),
    with λ_S the median of the row's entries (``exclude``d ones left out), two sweeps, in the
    rows of ``theta: (B, d)`` where that brings max|θ| below a quarter; the others are returned
    as they are. Offsets per row or column of a Birkhoff polytope (θ_ij + r_i + c_j) cost the
    solver accuracy, its tolerances being relative to max|θ|: r_i = 1e4·i cost x up to 3.6e-6,
    1e6·i up to 1.2e-4 (the quadratic). Rows with max|θ| ≤ 100 (where an offset costs x at most
    about tol·100) are skipped: the medians cost 1.3 ms for Birkhoff n = 10 at B = 128, 5 % of
    a solve."""
    if not sf.lines or theta.shape[0] == 0:
        return theta
    ex = torch.zeros_like(theta, dtype=torch.bool) if exclude is None else exclude
    big = (theta.masked_fill(ex, 0.0).abs().amax(1) > 100.0).nonzero()[:, 0]
    if big.numel() == 0:
        return theta
    if big.numel() < theta.shape[0]:
        return theta.index_put((big,), _remove_offsets(theta[big], sf, ex[big]))
    B, d = theta.shape
    nan = torch.full((B, 1), math.nan, dtype=theta.dtype, device=theta.device)
    cur = theta
    for _ in range(2):
        for lines in sf.lines:
            idx = torch.as_tensor(lines, device=theta.device)
            vals = torch.cat([cur.masked_fill(ex, math.nan), nan], 1)[:, idx]       # (B, rows, size)
            med = vals.nanmedian(-1).values.nan_to_num(0.0)                          # (B, rows)
            shift = torch.zeros(B, d + 1, dtype=theta.dtype, device=theta.device)
            shift[:, idx] = med[:, :, None].expand(-1, -1, idx.shape[1])
            cur = cur - shift[:, :d]
    size = lambda t: t.masked_fill(ex, 0.0).abs().amax(1)  # noqa: E731
    return torch.where((size(cur) < 0.25 * size(theta))[:, None], cur, theta)


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int],
         dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A torch CSR matrix from COO triplets (duplicates summed)."""
    M = sp.coo_matrix((vals, (rows, cols)), shape=shape).tocsr()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.as_tensor(M.indptr, dtype=torch.int64, device=device),
                                       torch.as_tensor(M.indices, dtype=torch.int64, device=device),
                                       torch.as_tensor(M.data, dtype=dtype, device=device), shape)


class _LinOp:
    """A constant constraint matrix ``K`` (rows × cols) applied to a batch: ``fwd(v) = v Kᵀ``
    (``(B, cols) → (B, rows)``) and ``adj(w) = w K`` (``(B, rows) → (B, cols)``).

    Sparse K (the flow and incidence rows of most formulations) is stored as CSR matrices for K
    and Kᵀ (for the 392 × 476 capacity rows of spanning trees on 8 vertices, 2 nonzeros per row,
    3.5× faster than the dense product at batch 128 on CPU), dense K as K and a contiguous Kᵀ.
    """

    def __init__(self, K: sp.csr_matrix, dtype: torch.dtype, device: torch.device):
        self.shape = K.shape
        cells = K.shape[0] * K.shape[1]
        self.sparse = cells > 0 and K.nnz <= 0.1 * cells
        if self.sparse:
            C = sp.coo_matrix(K)
            self.K = _csr(C.row, C.col, C.data, K.shape, dtype, device)
            self.KT = _csr(C.col, C.row, C.data, K.shape[::-1], dtype, device)
        else:
            self.K = torch.as_tensor(K.toarray(), dtype=dtype, device=device)
            self.KT = self.K.T.contiguous()

    def fwd(self, v: torch.Tensor) -> torch.Tensor:
        # as (K vᵀ)ᵀ: a batch-last v (the solver's layout) gives a batch-last result
        return (self.K @ v.T).T

    def adj(self, w: torch.Tensor) -> torch.Tensor:
        return (self.KT @ w.T).T


# the reduced Schur complement (the diagonal rows eliminated) is factored block by block where its
# rows, in a reverse Cuthill-McKee order, are banded and that costs less than this share of the
# dense factorization (flops: nk·(2.5 w³ + 2 w² (c1 + c2)) against m2³/3 + m2² m1, c1 and c2 the
# diagonal rows a block and a pair of neighbouring blocks meet), in at least
# _BAND_MIN_BLOCKS blocks. Correlated k-subsets with the entropy, fwd+bwd, t = 1, B = 32: n = 15
# (w = 25, share 0.57) 1.2x, n = 20 (0.32) 1.5x, n = 30 (0.31) 2.1x, n = 45 (0.15) 1.8x faster,
# the same steps; n = 10 (0.65, four blocks of 14) 0.77x
_BAND_SHARE = 0.6
_BAND_MIN_BLOCKS = 3


def _band(row_blocks: list[set[int]], diag_rows: list[int], rest: list[int], nb: int
          ) -> tuple[int, list[int], tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """``(w, order of rest, (c1, a, b))``: the rows ``rest`` reordered so that ``S22 − S21 S11⁻¹
    S12`` (rows coupled where they share a block of variables, directly or through a diagonal
    row) is block tridiagonal in blocks of w, where that pays (``_BAND_SHARE``); else None.
    ``c1 (nk, c)``: the diagonal rows that each block of rows meets (padded with m1), the only
    columns of S21 and W it has nonzero; ``a, b (nk − 1, ·)``: the diagonal rows that block k
    and block k − 1 both meet, as positions in ``c1[k]`` and ``c1[k − 1]`` (padded with c), the
    only columns that enter the product ``W_k W_{k−1}ᵀ`` of the sub-diagonal block."""
    m1, m2 = len(diag_rows), len(rest)
    if m2 < 4 * _BAND_MIN_BLOCKS:
        return None

    def incidence(rows: list[int]) -> sp.csr_matrix:
        r = np.array([i for i, q in enumerate(rows) for _ in row_blocks[q]], dtype=np.int64)
        c = np.array([bi for q in rows for bi in row_blocks[q]], dtype=np.int64)
        return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), max(nb, 1)))

    R2, R1 = incidence(rest), incidence(diag_rows)
    P21 = ((R2 @ R1.T) != 0).astype(np.float64)
    order, w = _rcm_width(((R2 @ R2.T) != 0).astype(np.float64) + P21 @ P21.T)
    nk = -(-m2 // w)
    if nk < _BAND_MIN_BLOCKS:
        return None
    met = sp.csr_matrix(P21)[order]
    blocks = [set(met[k * w: (k + 1) * w].indices.tolist()) for k in range(nk)]
    pairs = [blocks[k] & blocks[k - 1] for k in range(1, nk)]

    def padded(sets: list[set[int]]) -> np.ndarray:
        out = np.full((len(sets), max([len(c) for c in sets] + [1])), m1, dtype=np.int64)
        for k, c in enumerate(sets):
            out[k, : len(c)] = sorted(c)
        return out

    c1, c2 = padded(blocks), padded(pairs)
    if nk * (2.5 * w ** 3 + 2 * w * w * (c1.shape[1] + c2.shape[1])) > _BAND_SHARE * (m2 ** 3 / 3 + m2 * m2 * m1):
        return None
    # where a pair's columns sit in the lists of its two blocks (padding: one past the list's end)
    at = np.full((2,) + c2.shape, c1.shape[1], dtype=np.int64)
    for k in range(1, nk):
        got = c2[k - 1] < m1
        at[0, k - 1, got] = np.searchsorted(c1[k], c2[k - 1, got])
        at[1, k - 1, got] = np.searchsorted(c1[k - 1], c2[k - 1, got])
    return w, order.tolist(), (c1, at[0], at[1])


def _rcm_width(pattern: sp.spmatrix) -> tuple[np.ndarray, int]:
    """The reverse Cuthill–McKee order of a symmetric pattern and its bandwidth in that order
    (the largest distance between linked rows, plus one)."""
    pattern = sp.csr_matrix(pattern)
    m = pattern.shape[0]
    order = sp.csgraph.reverse_cuthill_mckee(pattern, symmetric_mode=True)
    where = np.empty(m, dtype=np.int64)
    where[order] = np.arange(m)
    C = pattern.tocoo()
    return order, int(np.abs(where[C.row] - where[C.col]).max(initial=0)) + 1


def looks_banded(P: Polytope) -> bool:
    """Whether P's equality rows, linked where they share a variable or variables linked by an
    inequality row, have a reverse Cuthill–McKee bandwidth of at most a quarter of their number:
    a test of tens of ms on thousands of rows (correlated k-subsets n = 200: 45 ms), taken before
    building the standard form, whose :func:`_band` decides. (Correlated k-subsets pass with
    ratios of 12 to 160; spanning trees, arborescences and Birkhoff polytopes fail at 1 to 1.6.)"""
    key = ("looks banded",)
    if key not in P.cache:
        A = (sp.csr_matrix(P.form.A_eq) != 0).astype(float)  # patterns (copies: the form stays as it is)
        G = (sp.csr_matrix(P.form.A_ub) != 0).astype(float)
        m, N = A.shape
        k, label = sp.csgraph.connected_components(G.T @ G + sp.eye(N), directed=False)
        rows = ((A @ sp.csr_matrix((np.ones(N), (np.arange(N), label)), shape=(N, k))) != 0).astype(float)
        P.cache[key] = m >= 4 * _rcm_width(rows @ rows.T)[1]
    return bool(P.cache[key])


def network_rows(P: Polytope) -> bool:
    """Whether :func:`_network_rows` settles the rank of P's equality rows (a flow's: rows with
    a column of their own, then flow conservation), so that the standard form needs no dense QR."""
    key = ("network rows",)
    if key not in P.cache:
        P.cache[key] = _network_rows(sp.csr_matrix(P.form.A_eq)) is not None
    return bool(P.cache[key])


def _schur_parts(m: int, m1: int, band: int = 0, cols: int = 0) -> tuple[int, int]:
    """Entries of S22 and S21 as assembled in ``[S22, S21, diag S11]``: dense, or (``band`` > 0)
    S22's diagonal and sub-diagonal blocks of ``band`` rows and S21 by blocks of rows, each
    with the ``cols`` diagonal rows of its column list."""
    m2 = m - m1
    if band:
        nk = -(-m2 // band)
        return (2 * nk - 1) * band * band, nk * band * cols
    return m2 * m2, m2 * m1


def _schur_layout(sf: StandardForm) -> tuple[int, int]:
    """:func:`_schur_parts` of ``sf``: the entries of its S22 and S21 as assembled."""
    cols = sf.band_cols[0].shape[1] if sf.band_cols is not None else 0
    return _schur_parts(sf.A.shape[0], sf.m1, sf.band, cols)


def _tensors(sf: StandardForm, dtype: torch.dtype, device: torch.device) -> dict:
    key = (dtype, str(device))
    if key not in sf.cache:
        t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        sf.cache[key] = {
            "b": t(sf.b), "h": t(sf.h),
            "Aop": _LinOp(sf.A, dtype, device), "Gop": _LinOp(sf.G, dtype, device),
            "Aabs": _LinOp(abs(sf.A), dtype, device), "Gabs": _LinOp(abs(sf.G), dtype, device),
            "L": t(np.where(np.isfinite(sf.L), sf.L, 0.0)), "U": t(np.where(np.isfinite(sf.U), sf.U, 0.0)),
            "hasL": torch.as_tensor(np.isfinite(sf.L), device=device),
            "hasU": torch.as_tensor(np.isfinite(sf.U), device=device),
            "domL": torch.as_tensor(sf.domL, device=device),
            "domU": torch.as_tensor(sf.domU, device=device),
            "blocks": torch.as_tensor(sf.blocks, device=device),
            "gflat": torch.as_tensor(sf.gpairs[0], device=device),
            "grow": torch.as_tensor(sf.gpairs[1], device=device),
            "gval": t(sf.gpairs[2]),
            # [S22, S21, diag S11] (flattened) = Sasm · M⁻¹ (flattened blocks, nb·s·s): one sparse product
            "Sasm": _csr(sf.spairs[0], sf.spairs[1], sf.spairs[2],
                         (sum(_schur_layout(sf)) + sf.m1, sf.blocks.size * sf.blocks.shape[1]), dtype, device),
            "schur": _schur_layout(sf),
            "m1": sf.m1,
            "band": sf.band,
            "band_cols": None if sf.band_cols is None else tuple(torch.as_tensor(c, device=device) for c in sf.band_cols),
            "layout": sf.layout,
            "structure": sf.structure,
            "crow": torch.as_tensor(sf.coef[0], device=device),
            "calpha": t(sf.coef[1]),
            "cbeta": t(sf.coef[2]),
        }
    return sf.cache[key]


@dataclass
class SolveReport:
    """Per-sample convergence of :func:`solve_torch` (all tensors of shape ``(B,)``)."""

    converged: torch.Tensor
    iterations: torch.Tensor
    kkt_residual: torch.Tensor
    tol: float = 0.0

    @property
    def status(self) -> list[str]:
        """'converged' (residual ≤ 10·tol), 'inaccurate' (stalled above that but below 1e-8;
        float32 1e-4), 'max_iter' or 'nan'."""
        out = []
        for c, r in zip(self.converged.tolist(), self.kkt_residual.tolist()):
            if not math.isfinite(r):
                out.append("nan")
            elif not c:
                out.append("max_iter")
            else:
                out.append("converged" if r <= self.tol * 10 else "inaccurate")
        return out


class _Newton:
    """Factorization of the reduced KKT system for one batch of iterates.

    ``M = D + Gᵀ Σ G`` (block diagonal), ``S = A M⁻¹ Aᵀ`` (its diagonal rows eliminated, the
    rest dense, Cholesky with a relative ridge);
    ``solve(r1, r2)`` returns Δz, Δy of ``[[M, Aᵀ], [A, 0]] [Δz; Δy] = [r1; r2]``.
    """

    def __init__(self, T: dict, D: torch.Tensor, Sig: torch.Tensor | None, work: dict | None = None):
        B, n = D.shape
        self.work = work
        blocks = T["blocks"]
        nb, sz = blocks.shape
        self.T, self.n = T, n
        Dpad = torch.cat([D, torch.ones(B, 1, dtype=D.dtype, device=D.device)], 1)
        self.kind = "diagonal" if sz == 1 else T["structure"]
        if self.kind == "diagonal":  # no inequality rows: M is diagonal
            self.Dinv = 1.0 / D
            self.MinvT = (1.0 / Dpad[:, blocks]).reshape(B, nb).T  # (nb, B): M⁻¹, batch last (for S)
            self._schur(T, D, B)
            return
        if self.kind == "star":
            # hub h (position 0), leaves l in rows α l + β h ≤ ·: eliminate the leaves. Every
            # term is positive (no cancellation) however far the barrier spreads D and Σ. As in
            # the block Cholesky below, a relative ridge of 1e-15 on the diagonal of M keeps the
            # steps of nearly tied variables (σ → ∞ at the end) from amplifying rounding errors.
            zero = torch.zeros(B, 1, dtype=D.dtype, device=D.device)
            sig = torch.cat([Sig, zero], 1)[:, T["crow"]] if Sig is not None else torch.zeros(B, *T["crow"].shape, dtype=D.dtype, device=D.device)
            al, be = T["calpha"], T["cbeta"]
            rr = 1e-15 if D.dtype == torch.float64 else 1e-7
            sa, sb = sig * al * al, sig * be * be
            Dh, Dl = Dpad[:, blocks[:, 0]], Dpad[:, blocks[:, 1:]]
            Dh = Dh + rr * (Dh + sb.sum(-1))
            Dl = Dl + rr * (Dl + sa)
            self.q = Dl + sa                                # (B, nb, s-1)
            self.rq = 1.0 / self.q
            self.c = sig * al * be * self.rq
            self.Sh = Dh + (sb * Dl * self.rq).sum(-1)      # (B, nb)
            self.rSh = 1.0 / self.Sh
            # M⁻¹ block = vvᵀ/Sh + diag(0, 1/q) with v = (1, −c), built batch-last: (nb, s, s, B)
            vecB = torch.cat([torch.ones_like(self.Sh)[..., None], -self.c], -1)     # (B, nb, s)
            vec = vecB.permute(1, 2, 0).contiguous()                               # (nb, s, B)
            if T["layout"] is not None:
                # per segment of equal stars, contiguous batch-last (stars, size, B) arrays for
                # minv: M⁻¹v = v ∘ (0, 1/q) + v_block (vᵀ v_block / Sh)
                rqpad = torch.cat([torch.zeros_like(self.Sh)[..., None], self.rq], -1).permute(1, 2, 0)
                rShT = self.rSh.T
                n0, segments = T["layout"]
                self.segs, off, b0 = [], n0, n0
                for snb, ss in segments:
                    self.segs.append((off, snb, ss, vec[b0: b0 + snb, :ss].contiguous(),
                                      rqpad[b0: b0 + snb, :ss].contiguous(), rShT[b0: b0 + snb, None].contiguous()))
                    off, b0 = off + snb * ss, b0 + snb
                self.rSh0 = rShT[:n0].contiguous()
            MinvT = torch.mul((vec * self.rSh.T[:, None, :])[:, :, None, :], vec[:, None, :, :],
                              out=self._buffer("MinvT", (nb, sz, sz, B), D))
            MinvT.diagonal(dim1=1, dim2=2)[..., 1:].add_(self.rq.permute(1, 0, 2))
            self.MinvT = MinvT.view(nb * sz * sz, B)
            self._schur(T, D, B)
            return
        M = torch.diag_embed(Dpad[:, blocks])  # (B, nb, sz, sz)
        if Sig is not None and T["grow"].numel():
            M = M.reshape(B, nb * sz * sz).index_add(1, T["gflat"], T["gval"] * Sig[:, T["grow"]]).reshape(B, nb, sz, sz)
        # Jacobi-scaled Cholesky per block, then the explicit (small) block inverses: the barrier
        # makes the entries span many orders of magnitude (an active inequality's Σ ~ 1/μ next to
        # a nearly free variable's ε)
        dgb = torch.diagonal(M, dim1=-2, dim2=-1)
        bsc = 1.0 / torch.sqrt(dgb.clamp_min(torch.finfo(D.dtype).tiny))
        Mt = M * bsc[..., :, None] * bsc[..., None, :]
        eyeb = torch.eye(sz, dtype=D.dtype, device=D.device)
        Lb, info = torch.linalg.cholesky_ex(Mt + (1e-15 if D.dtype == torch.float64 else 1e-7) * eyeb)
        if bool((info != 0).any()):
            Lb, _ = torch.linalg.cholesky_ex(Mt + 1e-10 * eyeb)
        self.Lb, self.bsc = Lb, bsc
        Minv = torch.cholesky_inverse(Lb) * bsc[..., :, None] * bsc[..., None, :]  # for S only
        self.MinvT = Minv.reshape(B, nb * sz * sz).T
        self._schur(T, D, B)

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialized array reused across the iterations of one solve (per name and shape;
        ``like``'s dtype unless given): a fresh multi-megabyte array per step costs more than the
        arithmetic (each comes from the system allocator, page faults and zeroing included: up to
        4 ms instead of 0.4 for the Schur product of spanning trees n = 8 at B = 128)."""
        key = (name, shape)
        if self.work is not None and key in self.work:
            return self.work[key]
        buf = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
        if self.work is not None:
            self.work[key] = buf
        return buf

    def _schur(self, T: dict, D: torch.Tensor, B: int) -> None:
        self.m = T["Aop"].shape[0]
        if not self.m:
            return
        # S = A M⁻¹ Aᵀ = [[S11, S21ᵀ], [S21, S22]] with S11 diagonal (the first m1 rows): only the
        # Schur complement S22 − S21 S11⁻¹ S21ᵀ (m2 × m2) is Cholesky-factored. The arrays live in
        # buffers reused across the iterations of one solve (:meth:`_buffer`). The reduced matrix
        # is symmetric, so its row-major buffer read as column-major (.mT) is itself: LAPACK gets
        # it without a copy.
        m, m1 = self.m, T["m1"]
        m2 = m - m1
        self.band = T["band"]
        if self.band:
            self._banded_schur(T, D, B)
            return
        K = sum(T["schur"]) + m1
        Sred = self._buffer("Sred", (B, m2, m2), D)
        Lc = self._buffer("Lc", (B, m2, m2), D).mT
        info = self._buffer("info", (B,), D, torch.int32)
        Sall = torch.mm(T["Sasm"], self.MinvT, out=self._buffer("Sall", (K, B), D))  # (K, B), batch last: read through permuted views
        ridge = 1e-14 if D.dtype == torch.float64 else 1e-7
        tiny = torch.finfo(D.dtype).tiny
        self.m1, self.m2 = m1, m2
        S22 = Sall[: m2 * m2].view(m2, m2, B).permute(2, 0, 1)
        # Jacobi scaling (and so the relative ridge) from the diagonal of S22, not of the reduced
        # matrix: as in a Cholesky factorization of all of S, whose first m1 pivots are these
        # rows. (Scaled by its own, possibly cancelled, diagonal the ridge was too small, and
        # degenerate flow problems lost rows to bad directions.)
        self.scale = 1.0 / torch.sqrt(torch.diagonal(S22, dim1=1, dim2=2).clamp_min(tiny))
        if m1:
            self._diagonal_rows(Sall, T, D, B, ridge)
            if m2:
                S = torch.baddbmm(S22, self.W, self.W.mT, alpha=-1.0, out=Sred)
        else:
            S = Sred.copy_(S22)
        if not m2:
            return
        S.mul_(self.scale[:, :, None]).mul_(self.scale[:, None, :])
        S.diagonal(dim1=1, dim2=2).add_(ridge)
        torch.linalg.cholesky_ex(S.mT, out=(Lc, info))
        if bool((info != 0).any()):
            S.diagonal(dim1=1, dim2=2).add_(1e4 * ridge)
            torch.linalg.cholesky_ex(S.mT, out=(Lc, info))
        self.Lc = Lc

    def _diagonal_rows(self, Sall: torch.Tensor, T: dict, D: torch.Tensor, B: int, ridge: float) -> None:
        """``sd1 = (diag S11 (1 + ridge))^{1/2} (B, m1)`` and ``W = S21 S11^{-1/2}``
        (``S21 S11⁻¹ S12 = W Wᵀ``) from the assembled ``[S22, S21, diag S11]``: dense ``(B, m2,
        m1)``, or with a band by blocks of rows, ``Wb (nk, B, w, c)``, block k's columns those
        of its list ``c1[k]`` (see :func:`_band`)."""
        m1, m2 = self.m1, self.m2
        s22, s21 = T["schur"]
        self.sd1 = Sall[s22 + s21:].clamp_min(torch.finfo(D.dtype).tiny).mul(1.0 + ridge).sqrt().T  # batch-last
        if not m2:
            return
        if self.band:
            c1 = T["band_cols"][0]
            nk, c = c1.shape
            S21 = Sall[s22: s22 + s21].view(nk, self.band, c, B).permute(0, 3, 1, 2)
            sd = torch.cat([self.sd1, torch.ones_like(self.sd1[:, :1])], 1)[:, c1]  # (B, nk, c); padding: 1
            self.Wb = torch.div(S21, sd.transpose(0, 1)[:, :, None, :], out=self._buffer("Wb", (nk, B, self.band, c), D))
        else:
            S21 = Sall[s22: s22 + s21].view(m2, m1, B).permute(2, 0, 1)
            self.W = torch.div(S21, self.sd1[:, None, :], out=self._buffer("W", (B, m2, m1), D))

    def _w_times(self, v: torch.Tensor) -> torch.Tensor:
        """``W v`` for ``v (B, m1)``: ``(B, m2)``."""
        if not self.band:
            # (B, 1, m1) @ (B, m1, m2) runs ~4x faster than (B, m2, m1) @ (B, m1, 1) on this CPU once
            # W has a few hundred entries (spanning trees n = 8: 56 × 28), slower below; (bmm
            # wants row-major vectors: a batch-last one makes it ~10x slower)
            vc = v.contiguous()
            if self.m1 * self.m2 > 400:
                return torch.bmm(vc[:, None, :], self.W.mT)[:, 0]
            return torch.bmm(self.W, vc[..., None])[..., 0]
        c1 = self.band_cols[0]
        B = v.shape[0]
        vk = torch.cat([v, torch.zeros_like(v[:, :1])], 1)[:, c1].transpose(0, 1)  # (nk, B, c)
        out = torch.matmul(self.Wb, vk[..., None])[..., 0]                       # (nk, B, w)
        return out.transpose(0, 1).reshape(B, -1)[:, : self.m2]

    def _wt_times(self, v: torch.Tensor) -> torch.Tensor:
        """``Wᵀ v`` for ``v (B, m2)``: ``(B, m1)``."""
        if not self.band:
            vc = v.contiguous()
            if self.m1 * self.m2 > 400:
                return torch.bmm(vc[:, None, :], self.W)[:, 0]
            return torch.bmm(self.W.mT, vc[..., None])[..., 0]
        c1 = self.band_cols[0]
        nk, c = c1.shape
        B = v.shape[0]
        vk = torch.zeros(B, nk * self.band, dtype=v.dtype, device=v.device)
        vk[:, : self.m2] = v
        got = torch.matmul(vk.view(B, nk, 1, self.band).transpose(0, 1), self.Wb)[:, :, 0]  # (nk, B, c)
        out = torch.zeros(B, self.m1 + 1, dtype=v.dtype, device=v.device)
        out.index_add_(1, c1.reshape(-1), got.transpose(0, 1).reshape(B, nk * c))
        return out[:, : self.m1]

    def _banded_schur(self, T: dict, D: torch.Tensor, B: int) -> None:
        """:meth:`_schur` where the reduced matrix ``R = S22 − W Wᵀ`` is block tridiagonal
        (``T["band"]``: the blocks' size w; the last block padded with 1 on the diagonal): the
        same scaling and ridge, S22 assembled and R formed on the blocks only, then factored
        block by block, ``C_k C_kᵀ = R_kk − X_k X_kᵀ`` with ``X_k = R_k,k−1 C_{k−1}⁻ᵀ``. Blocks
        are stored ``(nk, B, ·, ·)``, each one contiguous for the batched calls."""
        m, m1, w = self.m, T["m1"], self.band
        m2 = m - m1
        nk = -(-m2 // w)
        s22, s21 = T["schur"]
        K = s22 + s21 + m1
        ridge = 1e-14 if D.dtype == torch.float64 else 1e-7
        tiny = torch.finfo(D.dtype).tiny
        Sall = torch.mm(T["Sasm"], self.MinvT, out=self._buffer("Sall", (K, B), D))
        self.m1, self.m2 = m1, m2
        diag = Sall[: nk * w * w].view(nk, w, w, B).permute(0, 3, 1, 2)     # (nk, B, w, w)
        sub = Sall[nk * w * w: s22].view(nk - 1, w, w, B).permute(0, 3, 1, 2)
        pad = (torch.arange(nk * w, device=D.device) >= m2).view(nk, 1, w)
        d = torch.diagonal(diag, dim1=2, dim2=3)                            # (nk, B, w)
        sc = torch.where(pad, 1.0, 1.0 / torch.sqrt(d.clamp_min(tiny)))
        self.scale = sc.transpose(0, 1).reshape(B, nk * w)[:, :m2]
        Rd = diag.contiguous()
        Rs = sub.contiguous()
        self.band_cols = T["band_cols"]
        if m1:
            self._diagonal_rows(Sall, T, D, B, ridge)
            _, a, b = self.band_cols
            Wb = self.Wb
            c = Wb.shape[3]
            Rd = torch.baddbmm(Rd.view(nk * B, w, w), Wb.reshape(nk * B, w, c), Wb.reshape(nk * B, w, c).mT,
                               alpha=-1.0).view(nk, B, w, w)
            if nk > 1:  # W_k W_{k−1}ᵀ over the columns both blocks have (padding: a zero column c)
                Wp = torch.nn.functional.pad(Wb, (0, 1))

                def cols(W: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
                    return torch.take_along_dim(W, at[:, None, None, :].expand(-1, B, w, -1), 3).reshape(-1, w, at.shape[1])

                Rs = torch.baddbmm(Rs.view(-1, w, w), cols(Wp[1:], a), cols(Wp[:-1], b).mT,
                                   alpha=-1.0).view(nk - 1, B, w, w)
        Rd = Rd * sc[..., :, None] * sc[..., None, :]
        Rs = Rs * sc[1:, :, :, None] * sc[:-1, :, None, :]
        Rd.diagonal(dim1=2, dim2=3).add_(torch.where(pad, 1.0, ridge).expand(nk, B, w))
        C = torch.empty_like(Rd)
        X = torch.empty_like(Rs)
        for extra in (0.0, 1e4 * ridge):
            if extra:
                Rd.diagonal(dim1=2, dim2=3).add_(extra)
            failed = False
            for k in range(nk):
                Rk = Rd[k]
                if k:
                    X[k - 1] = torch.linalg.solve_triangular(C[k - 1], Rs[k - 1].mT, upper=False).mT
                    Rk = torch.baddbmm(Rk, X[k - 1], X[k - 1].mT, alpha=-1.0)
                C[k], info = torch.linalg.cholesky_ex(Rk)
                failed = failed or bool((info != 0).any())
            if not failed:
                break
        self.C, self.X, self.nk = C, X, nk

    def _banded_solve(self, r2: torch.Tensor) -> torch.Tensor:
        """``R⁻¹ r2`` with the block factors of :meth:`_banded_schur` (forward and back
        substitution over the blocks), ``r2: (B, m2)``."""
        m2, w, nk = self.m2, self.band, self.nk
        B = r2.shape[0]
        v = torch.zeros(nk * w, B, dtype=r2.dtype, device=r2.device)
        v[:m2] = (r2 * self.scale).T
        v = v.view(nk, w, B).transpose(1, 2)[..., None]                     # (nk, B, w, 1)
        z: list[torch.Tensor] = []
        for k in range(nk):
            rk = v[k] if not k else torch.baddbmm(v[k], self.X[k - 1], z[-1], alpha=-1.0)
            z.append(torch.linalg.solve_triangular(self.C[k], rk, upper=False))
        y = z[:]
        for k in range(nk - 1, -1, -1):
            rk = z[k] if k == nk - 1 else torch.baddbmm(z[k], self.X[k].mT, y[k + 1], alpha=-1.0)
            y[k] = torch.linalg.solve_triangular(self.C[k].mT, rk, upper=True)
        return torch.stack(y)[..., 0].transpose(1, 2).reshape(nk * w, B)[:m2].T * self.scale

    def s_solve(self, r: torch.Tensor) -> torch.Tensor:
        """``S⁻¹ r`` by block elimination of the diagonal rows and two triangular solves (on CPU
        about 2x faster than cholesky_solve here)."""
        m1, m2 = self.m1, self.m2
        r1 = r[:, :m1] / self.sd1 if m1 else r[:, :0]
        r2 = r[:, m1:]
        if m1 and m2:
            r2 = r2 - self._w_times(r1)
        if m2:
            if self.band:
                y2 = self._banded_solve(r2)
            else:
                w = torch.linalg.solve_triangular(self.Lc, (r2 * self.scale)[..., None], upper=False)
                y2 = torch.linalg.solve_triangular(self.Lc.mT, w, upper=True)[..., 0] * self.scale
            if not m1:
                return y2
            y1 = (r1 - self._wt_times(y2)) / self.sd1
            return torch.cat([y1.T, y2.T], 0).T  # batch-last, like the iterates
        return r1 / self.sd1

    def minv(self, v: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ v``: closed form for stars, else triangular solves with the block factors."""
        if self.kind == "diagonal":
            return v * self.Dinv
        B = v.shape[0]
        if self.kind == "star" and self.T["layout"] is not None:  # contiguous: singletons, then stars
            n0 = self.T["layout"][0]
            vt = v.T  # (n, B): contiguous for the solver's batch-last iterates
            parts = [vt[:n0] * self.rSh0]
            for off, nb, s, vec, rqpad, rSh in self.segs:  # nb stars of s variables: (nb, s, B)
                vs = vt[off: off + nb * s].reshape(nb, s, B)
                h = (vs * vec).sum(1, keepdim=True) * rSh
                parts.append(torch.addcmul(vs * rqpad, vec, h).view(nb * s, B))
            return torch.cat(parts, 0).T
        blocks = self.T["blocks"]
        vp = torch.cat([v, torch.zeros(B, 1, dtype=v.dtype, device=v.device)], 1)[:, blocks]
        if self.kind == "star":
            h = (vp[..., 0] - (self.c * vp[..., 1:]).sum(-1)) * self.rSh
            out = torch.cat([h[..., None], vp[..., 1:] * self.rq - self.c * h[..., None]], -1)
        else:
            out = torch.cholesky_solve((vp * self.bsc)[..., None], self.Lb)[..., 0] * self.bsc
        res = torch.zeros(B, self.n + 1, dtype=v.dtype, device=v.device)
        res[:, blocks.reshape(-1)] = out.reshape(B, blocks.numel())
        return res[:, : self.n]

    def solve(self, r1: torch.Tensor, r2: torch.Tensor | None, refine: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.m:
            return self.minv(r1), None
        A = self.T["Aop"]
        rhs = A.fwd(self.minv(r1)) - r2
        dy = self.s_solve(rhs)
        if refine:  # one refinement step against the exact A M⁻¹ Aᵀ
            dy = dy + self.s_solve(rhs - A.fwd(self.minv(A.adj(dy))))
        return self.minv(r1 - A.adj(dy)), dy


def _plus_aux(D: torch.Tensor, d: int, extra: float | torch.Tensor) -> torch.Tensor:
    """``D (B, n)`` with ``extra`` (a number, or per row ``(B, 1)``) added to the auxiliary
    variables' entries ``D[:, d:]``: the curvature the Newton systems give them beyond ε."""
    return D if D.shape[1] == d else torch.cat([D[:, :d], D[:, d:] + extra], 1)


def _batch_last(v: torch.Tensor) -> torch.Tensor:
    """``v: (B, k)`` as a view of a contiguous ``(k, B)`` array (same values)."""
    return v.T.contiguous().T


def _rows(v: torch.Tensor, ix: torch.Tensor | slice) -> torch.Tensor:
    """Rows ``ix`` of ``v: (B, k)``, batch-last like ``v`` (a view for a slice)."""
    return v[ix] if isinstance(ix, slice) else v.T.index_select(1, ix).T


def _ipm(theta: torch.Tensor, sf: StandardForm, reg: Regularizer, tol: float | None, max_iter: int,
         forbidden: torch.Tensor | None = None):
    """Primal-dual interior-point iterations; returns (z, backward Newton state, report).

    ``forbidden: (B, d)`` marks free outputs whose θ is the stand-in for ``-inf`` (see
    :mod:`convex_sst._forbidden`): they are left out of the scale of θ that the tolerances are
    relative to, and start near their lower bound with the multiplier that balances θ there
    (the caller adds the entries it raised with :func:`~convex_sst._forbidden.raise_far_below`)."""
    B, d = theta.shape
    grad, hess = reg.grad, reg.hess
    if grad is None or hess is None:  # pragma: no cover - relax_torch checks this first
        raise SolverError(f"the torch solver needs the gradient and Hessian of {reg.name!r}")
    dtype, device = theta.dtype, theta.device
    T = _tensors(sf, dtype, device)
    b, hv, Lb, Ub, hasL, hasU = T["b"], T["h"], T["L"], T["U"], T["hasL"], T["hasU"]
    m, n = T["Aop"].shape
    p = T["Gop"].shape[0]
    f64 = dtype == torch.float64
    tol = (1e-10 if f64 else 1e-5) if tol is None else tol
    accept = max(tol, 1e-8 if f64 else 1e-4)  # stalled rows below this count as converged (inaccurate)
    # ε/2‖aux‖²: selects the minimum-norm aux among optimal ones (degenerate formulations) and
    # gives every variable curvature; it moves x by O(ε)
    eps_aux = 1e-10 if f64 else 1e-6
    # the tolerances are relative to this scale; a forbidden coordinate's stand-in utility
    # (thousands) would loosen them as much (x off by up to 1e-4 on rows reported converged)
    if forbidden is None:
        forbidden = torch.zeros_like(theta, dtype=torch.bool)
    mag = theta.abs().masked_fill(forbidden, 0.0)
    scale = 1.0 + mag.amax(1)
    # ... except in rows with entries far above the others (θ_j = u_j + c to force a choice): one
    # scale from those let the other coordinates off by tol·c (x off by up to 2e-2 at c = 1e9 in
    # rows reported converged; such entries now arrive lowered to a few hundred, where it was
    # still 1.5e-7). There each coordinate (and each complementarity pair) is judged relative to
    # the magnitudes of the terms in its own dual residual, its rounding floor
    # (:func:`_coordinate_scales`), between the scale of the row without those entries and the
    # scale with them.
    typical = 1.0 + theta.abs().masked_fill(forbidden, math.nan).nanmedian(1).values.nan_to_num(0.0)
    lower = 1.0 + mag.masked_fill(mag > _FAR_ABOVE * typical[:, None], 0.0).amax(1)
    outliers = bool((lower < scale).any())
    scales = torch.stack([lower, scale], 1)
    dlo, dhi = sf.domain
    # auxiliary variables under a regularizer with domain ends (the flow formulations with the
    # entropies): no polish for ambiguous rows there (finish()), and _PEND_WEIGHT_FLOWS instead
    flows = n > d and (math.isfinite(dlo) or math.isfinite(dhi))
    inside_lo = float(np.nextafter(dlo, math.inf)) if math.isfinite(dlo) else None
    inside_hi = float(np.nextafter(dhi, -math.inf)) if math.isfinite(dhi) else None
    lo = torch.where(hasL, Lb, torch.full_like(Lb, -math.inf))
    hi = torch.where(hasU, Ub, torch.full_like(Ub, math.inf))
    fl, fh = torch.isfinite(lo), torch.isfinite(hi)
    z0 = torch.where(fl & fh, 0.5 * (lo + hi), torch.where(fl, lo + 1.0, torch.where(fh, hi - 1.0, torch.zeros_like(lo))))
    # The iterates are (B, ·) views of batch-last (·, B) arrays: the sparse constraint products
    # K @ vᵀ then read and write contiguous arrays (2.5-4.7x faster than with row-major v for
    # spanning trees n = 8 at B = 128), and elementwise operations derived from them keep the
    # layout (mixing the two layouts makes them ~4x slower).
    theta = _batch_last(theta)
    # forbidden outputs start 1e-4 above their lower bound, with the multiplier that balances
    # their stand-in utility there (f'(x) − θ − zl = 0): from the centre, they took 1.3-1.9x the
    # iterations to fall (arborescences n = 6 with 30 % forbidden: 19.1, now 12.4)
    warm = forbidden & hasL[:d]
    x0 = torch.where(warm, Lb[:d] + 1e-4, z0[:d])
    z0 = torch.cat([x0, z0[d:].expand(B, n - d)], 1)
    zl0 = hasL.to(dtype).expand(B, n)
    zl0 = torch.cat([torch.where(warm, (grad(x0) - theta).clamp_min(1.0), zl0[:, :d]), zl0[:, d:]], 1)
    z = _batch_last(z0.expand(B, n))
    y = _batch_last(torch.zeros(B, m, dtype=dtype, device=device))
    Aop, Gop = T["Aop"], T["Gop"]
    s = _batch_last((hv - Gop.fwd(z)).clamp_min(1.0) if p else torch.zeros(B, 0, dtype=dtype, device=device))
    lam = _batch_last(torch.ones(B, p, dtype=dtype, device=device))
    zl = _batch_last(zl0)
    zu = _batch_last(hasU.to(dtype).expand(B, n))
    ncomp = max(1, int(hasL.sum() + hasU.sum()) + p)
    active = torch.ones(B, dtype=torch.bool, device=device)
    iters = torch.zeros(B, dtype=torch.long, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    zero1 = torch.zeros((), dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny

    xl, xu = hasL & ~T["domL"], hasU & ~T["domU"]

    def state(th, scs, z, y, s, lam, zl, zu):
        x = z[:, :d]
        g = eps_aux * z
        g[:, :d] = grad(x) - th
        hh = torch.full_like(z, eps_aux)
        hh[:, :d] = hess(x)
        rd = g - zl + zu
        if m:
            rd = rd + Aop.adj(y)
        if p:
            rd = rd + Gop.adj(lam)
        rp = Aop.fwd(z) - b
        rs = Gop.fwd(z) + s - hv
        gl = torch.where(hasL, z - Lb, one)
        gu = torch.where(hasU, Ub - z, one)
        # 1/gap where there is a bound, 0 where there is none: the masks of the Newton systems
        # below ride on these (zl = zu = 0 there), with no torch.where per use
        rgl = torch.where(hasL, gl.clamp_min(tiny).reciprocal(), zero1)
        rgu = torch.where(hasU, gu.clamp_min(tiny).reciprocal(), zero1)
        pl, pu, ps = gl * zl, gu * zu, s * lam
        mu = (pl.sum(1) + pu.sum(1) + ps.sum(1)) / ncomp
        D = hh + zl * rgl + zu * rgu
        # complementarity 1000x tighter: a weakly active bound's gap shrinks only like sqrt(mu);
        # relative to the scale of θ, like the dual residual (the multipliers scale with θ)
        if outliers:  # per coordinate and pair
            c, cs = _coordinate_scales(th, g, y, lam, zl, zu, scs, T)
            pl, pu, ps = pl / c, pu / c, ps / cs
            r = (rd.abs() / (D.clamp_min(1.0) * c)).amax(1)
            r = torch.maximum(r, 1e3 * (pl.sum(1) + pu.sum(1) + ps.sum(1)) / ncomp)
            sc = torch.ones_like(r)
        else:
            sc = scs[:, 1]
            r = torch.maximum((rd.abs() / D.clamp_min(1.0)).amax(1), 1e3 * mu) / sc
        if m:
            r = torch.maximum(r, rp.abs().amax(1))
        if p:
            r = torch.maximum(r, rs.abs().amax(1))
        # ... and, once that is within `accept`, the largest *unresolved* pair (slack and
        # multiplier within _RESOLVED of each other) 100x tighter (on flows, _PEND_WEIGHT_FLOWS):
        # the mean over hundreds of pairs let one lag at 5e-9 (a matching's column with true slack
        # 1e-5 at slack 2e-5 and λ 2e-4: x off by 6e-6, reported converged, and the backward could
        # not tell whether the column was full). Resolved pairs (a full column with λ = 6, slack
        # 3e-11) and rows that stall above `accept` (degenerate ones, which go to the polish) are
        # judged as before.
        pend = torch.maximum(_unresolved(pl, gl, zl).amax(1), _unresolved(pu, gu, zu).amax(1))
        if p:
            pend = torch.maximum(pend, _unresolved(ps, s, lam).amax(1))
        pend = pend / sc
        tight = 1e2 * pend
        if flows:
            tight = torch.maximum(tight, (_PEND_WEIGHT_FLOWS * pend).clamp_max(accept))
        return hh, rd, rp, rs, gl, gu, rgl, rgu, mu, D, torch.where(r <= accept, torch.maximum(r, tight), r)

    def ambiguity(scs: torch.Tensor, z: torch.Tensor, s: torch.Tensor, lam: torch.Tensor, zl: torch.Tensor,
                  zu: torch.Tensor) -> torch.Tensor:
        """Per row, the largest :func:`_ambiguity` of the bounds that are constraints (not an open
        domain's ends) and of the inequality rows."""
        sc1 = scs[:, 1:]
        amb = torch.maximum(torch.where(xl, _ambiguity(z - Lb, zl, sc1), 0.0).amax(1),
                            torch.where(xu, _ambiguity(Ub - z, zu, sc1), 0.0).amax(1))
        if p:
            amb = torch.maximum(amb, _ambiguity(s, lam, sc1).amax(1))
        return amb

    best = [v.clone() for v in (z, y, s, lam, zl, zu)]
    best_res = torch.full((B,), math.inf, dtype=dtype, device=device)
    # each row's latest iterate within 1e4·accept (the fallback after the loop: the last step
    # can break down, residual 2e-7 to 8e260 on a tied spanning-tree row); copied only where it
    # is not also the best (while the residual falls, it is)
    recent = [v.clone() for v in (z, y, s, lam, zl, zu)]
    recent_res = torch.full((B,), math.inf, dtype=dtype, device=device)
    recent_is_best = torch.zeros(B, dtype=torch.bool, device=device)
    history = torch.full((max_iter, B), math.inf, dtype=dtype, device=device)
    # rows that get _AUX_PROX on the auxiliary variables' curvature in their Newton matrix (set
    # for good once their primal residual stalls), and each row's last primal residual
    stiff = torch.zeros(B, dtype=torch.bool, device=device) if m and n > d else None
    rp_prev = torch.full((B,), math.inf, dtype=dtype, device=device)
    work: dict = {}  # Schur buffers per batch size, reused across iterations
    for it in range(max_iter):
        # each iteration works on the rows still running only: the batch's stragglers (a few
        # degenerate samples) then cost a fraction of a full-batch iteration
        running = active.nonzero()[:, 0]
        if running.numel() == 0:
            break
        # every row running: views instead of gathered copies
        ix: torch.Tensor | slice = slice(None) if running.numel() == B else running
        th, scs = _rows(theta, ix), scales[ix]
        zz, yy, ss, ll, zlz, zuz = (_rows(v, ix) for v in (z, y, s, lam, zl, zu))
        hh, rd, rp, rs, gl, gu, rgl, rgu, mu, D, resid = state(th, scs, zz, yy, ss, ll, zlz, zuz)
        if stiff is not None:  # rows whose primal residual leads and stopped halving (_AUX_PROX)
            rpn = rp.abs().amax(1)
            stiff[ix] |= (rpn > 0.5 * rp_prev[ix]) & (rpn >= 0.5 * resid) & (resid > tol) & (resid <= 1e4 * accept)
            rp_prev[ix] = rpn
        # keep each row's best iterate: degenerate duals (dependent active constraints) can drift
        # once the primal has converged, and a drifting row is stopped and rolled back (the
        # tests below only look at iterates within 1e4·accept, so only those are kept)
        bres = best_res[ix]
        better = torch.isfinite(resid) & (resid < bres) & (resid <= 1e4 * accept)
        if bool(better.any()):
            for v, bv in zip((zz, yy, ss, ll, zlz, zuz), best):
                bv[ix] = torch.where(better[:, None], v, bv[ix])
        bres = torch.where(better, resid, bres)
        best_res[ix] = bres
        history[it, ix] = resid
        near = torch.isfinite(resid) & (resid <= 1e4 * accept)
        own = near & ~better
        if bool(own.any()):
            for v, rv in zip((zz, yy, ss, ll, zlz, zuz), recent):
                rv[ix] = torch.where(own[:, None], v, rv[ix])
        recent_is_best[ix] = torch.where(near, better, recent_is_best[ix])
        recent_res[ix] = torch.where(near, resid, recent_res[ix])
        done = resid <= tol
        # a row that stopped improving near its floating-point floor stops here: less than 2x in 3
        # steps once within 10·tol (counted as converged), in 8 steps once within 1e4·accept
        # (counted as converged within `accept`, else reported as not converged; without this,
        # such rows can sit at 2e-8 until the iteration cap: degenerate flow problems with the
        # quadratic)
        if it >= 3:
            done = done | ((resid > 0.5 * history[it - 3, ix]) & (bres <= 10 * tol))
        if it >= 8:
            done = done | ((resid > 0.5 * history[it - 8, ix]) & (bres <= 1e4 * accept))
        # a row whose residual grew 100x past its best once close to convergence (dual drift) stops
        done = done | ((resid > 100 * bres) & (bres <= 1e4 * accept)) | ~torch.isfinite(resid)
        active[ix] = ~done
        keep = (~done).nonzero()[:, 0]
        if keep.numel() == 0:
            break
        if keep.numel() < resid.numel():
            ix = keep if isinstance(ix, slice) else ix[keep]
            th, zz, yy, ss, ll, zlz, zuz = (_rows(v, keep) for v in (th, zz, yy, ss, ll, zlz, zuz))
            hh, rd, rp, rs, gl, gu, D, rgl, rgu = (_rows(v, keep) for v in (hh, rd, rp, rs, gl, gu, D, rgl, rgu))
            mu = mu[keep]
        rss = Sig = None
        if p:
            rss = ss.clamp_min(tiny).reciprocal()
            Sig = ll * rss
        if stiff is not None:
            D = _plus_aux(D, d, _AUX_PROX * stiff[ix][:, None].to(dtype))
        newton = _Newton(T, D, Sig, work)
        # reciprocals of the other positive quantities, for the step lengths (entries without a
        # bound: 0, so they never limit the step)
        rzl = torch.where(hasL, zlz.clamp_min(tiny).reciprocal(), zero1)
        rzu = torch.where(hasU, zuz.clamp_min(tiny).reciprocal(), zero1)
        rll = ll.clamp_min(tiny).reciprocal() if p else None
        x = zz[:, :d]
        rxl = (x - dlo).clamp_min(tiny).reciprocal() if math.isfinite(dlo) else None
        rxh = (dhi - x).clamp_min(tiny).reciprocal() if math.isfinite(dhi) else None

        # products shared by the two directions of this iteration
        glzl, guzu = gl * zlz, gu * zuz
        nrgl, nrgu = rgl.neg(), rgu.neg()
        if rss is not None:  # p > 0
            sl, lrs, nrss = ss * ll, ll * rs, rss.neg()

        def direction(target, ccl, ccu, cc):
            """Newton direction for complementarity targets ``gl·zl = target − ccl`` etc.
            (``rgl``, ``rgu`` are 0 where there is no bound: those entries of ``rcl``, ``rcu``
            never reach the results.)"""
            rcl = glzl + (ccl - target)
            rcu = guzu + (ccu - target)
            rc = sl + (cc - target) if p else None
            rt = torch.addcmul(torch.addcmul(rd, rcl, rgl), rcu, rgu, value=-1.0)  # rd + rcl/gl − rcu/gu
            if p:
                rt = rt + Gop.adj((lrs - rc) * rss)
            # no refinement here: the next iteration recomputes the residuals exactly, so a
            # slightly inexact direction costs nothing measurable (same iteration counts)
            dz, dy = newton.solve(rt.neg_(), -rp if m else None, refine=False)
            ds = dlam = None
            if rc is not None:  # p > 0
                ds = Gop.fwd(dz).add_(rs).neg_()                   # −rs − G Δz
                dlam = torch.addcmul(rc, ll, ds).mul_(nrss)        # −(rc + λ Δs) / s
            dzl = torch.addcmul(rcl, zlz, dz).mul_(nrgl)           # −(rcl + zl Δz) / gl
            dzu = torch.addcmul(rcu, zuz, dz, value=-1.0).mul_(nrgu)  # (zu Δz − rcu) / gu
            return dz, dy, ds, dlam, dzl, dzu

        def max_step(dz, ds, dlam, dzl, dzu):
            """Largest step keeping every gap and multiplier positive: ``−1 / min(Δv / v)`` over
            the pairs (v, Δv) when that minimum is negative, else inf."""
            r = torch.minimum((dz * rgl).amin(1), (dz * rgu).neg_().amin(1))
            r = torch.minimum(r, torch.minimum((dzl * rzl).amin(1), (dzu * rzu).amin(1)))
            if p:
                r = torch.minimum(r, torch.minimum((ds * rss).amin(1), (dlam * rll).amin(1)))
            if rxl is not None:
                r = torch.minimum(r, (dz[:, :d] * rxl).amin(1))
            if rxh is not None:
                r = torch.minimum(r, (dz[:, :d] * rxh).neg_().amin(1))
            return torch.where(r < 0, -1.0 / r, math.inf)

        # Mehrotra predictor-corrector: the affine-scaling direction (target 0) measures how much
        # complementarity one full step would remove; the centering σ = (μ_aff/μ)³ and the
        # second-order correction of the products reuse the same factorization
        zt = torch.zeros_like(mu)[:, None]
        dza, _, dsa, dlama, dzla, dzua = direction(zt, zero1, zero1, zero1 if p else None)
        aa = torch.clamp(max_step(dza, dsa, dlama, dzla, dzua), max=1.0)[:, None]
        # (no bound: zl = Δzl = 0, so those products vanish)
        mua = ((torch.addcmul(gl, aa, dza) * torch.addcmul(zlz, aa, dzla)).sum(1)
               + (torch.addcmul(gu, aa, dza, value=-1.0) * torch.addcmul(zuz, aa, dzua)).sum(1)
               + ((torch.addcmul(ss, aa, dsa) * torch.addcmul(ll, aa, dlama)).sum(1) if p else 0.0)) / ncomp
        sigma = torch.nan_to_num((mua / mu).clamp(0.0, 1.0) ** 3, nan=0.2).clamp_min(1e-3)
        dz, dy, ds, dlam, dzl, dzu = direction(
            (sigma * mu)[:, None],
            torch.nan_to_num(dza * dzla),
            torch.nan_to_num(-dza * dzua),
            torch.nan_to_num(dsa * dlama) if p else None)
        alpha = torch.clamp(0.99 * max_step(dz, ds, dlam, dzl, dzu), max=1.0)
        # one reduction per array: a row sum is finite iff every entry is (barring overflow of
        # the sum, which would be a broken step anyway)
        sums = dz.sum(1) + dzl.sum(1) + dzu.sum(1)
        if m:
            sums = sums + dy.sum(1)
        if p:
            sums = sums + ds.sum(1) + dlam.sum(1)
        finite = torch.isfinite(sums) & torch.isfinite(alpha)
        active[ix] = finite  # a row whose step broke down stops here (reported as not converged)
        clean = bool(finite.all())
        a = (alpha if clean else torch.where(finite, alpha, 0.0))[:, None]
        for full, part, step in ((z, zz, dz), (zl, zlz, dzl), (zu, zuz, dzu)) + (((y, yy, dy),) if m else ()) + (
                ((s, ss, ds), (lam, ll, dlam)) if p else ()):
            step = step if clean else torch.nan_to_num(step)
            if isinstance(ix, slice):  # every row running: `part` is a view of `full`
                full.addcmul_(a, step)
            else:
                full[ix] = torch.addcmul(part, a, step)
        iters[ix] += finite.long()
        # an entropy's gradient is infinite at the ends of its domain: a coordinate that the
        # step rounds onto an end (θ far above the others, 1 − x below float resolution) stays
        # on the last float inside
        if math.isfinite(dlo) or math.isfinite(dhi):
            z[:, :d].clamp_(min=inside_lo, max=inside_hi)
    resid = state(theta, scales, z, y, s, lam, zl, zu)[-1]
    last, last_resid = [z, y, s, lam, zl, zu], resid
    better = torch.isfinite(resid) & (resid < best_res)
    z, y, s, lam, zl, zu = [torch.where(better[:, None], v, bv) for v, bv in zip(last, best)]
    # Rows that stalled above `accept`: degenerate problems, whose weakly active constraints (slack
    # and multiplier both ~sqrt(μ)) need μ far below where the strongly active slacks reach the
    # rounding floor (arborescences with nearly uniform utilities: every row stalled, x off by
    # 8e-6). From the best iterate, an active-set Newton polish (_polish); a candidate is kept
    # where its own KKT residual (with its bound, sign and inequality violations) is smaller. A
    # held constraint whose multiplier comes out negative is dropped, a dropped one that is
    # violated is held, and the polish repeated (at most _POLISH_ROUNDS rounds; it stops when the
    # held set no longer changes). Rows within `accept` are left as they are: each round costs 6
    # Newton factorizations however few rows it works on.
    # Rows within `accept` with an *ambiguous* pair: a bound or inequality row whose slack and
    # multiplier are within _RESOLVED of each other and both above _DEGENERATE (the multiplier
    # relative to the scale of θ). The convergence test bounds their product, not each: a
    # constraint active with a small multiplier δ keeps a slack of similar size, and that slack is
    # the error of x; the backward cannot tell whether to hold it. Measured: a k-subset's x_j ≤ 1
    # with δ = 5e-5 (entropy) at slack 1.5e-7, gradient off by 0.52; a matching's column with
    # δ = 4.4e-6 at slack 5e-6, x off by 3.3e-6 and the gradient by 0.037; with the quadratic,
    # tied utilities (small integers: bounds active with zero multipliers), x off by up to 1.7e-6;
    # all reported converged. Those rows are polished too, holding only the resolved active
    # constraints (held, the tied ones' multipliers were not unique and came out negative; the
    # polish then holds the ones its candidate violates). Not under a regularizer with domain ends
    # (the entropies) where P has auxiliary variables: in the flow formulations (trees,
    # arborescences) the flows are not unique, and pairs on the flows' bounds and capacity rows
    # stay ambiguous in most rows (9 batches of 64 rows: 0.6 to 2.7 polish rounds per row, 35 to
    # 70 % more time for spanning trees). Left so: on trees (n = 5) with the entropy at t = 0.3
    # and integer utilities, 21 rows of 128 keep x off by up to 5.5e-7 (reported converged, at
    # residuals below tol; against this solver on the subtour form, which has no auxiliary
    # variables); Gaussian utilities agree to 1e-8. (Rows that stall are helped by the fallback
    # to the last iterate below: on n = 6, 5.9e-5 → 5e-7.) With the quadratic they count there
    # too: tied integer utilities on spanning trees (n = 5) left 2 rows of 256 reported converged
    # with x off by 1.4e-5 and 6.4e-6 (ambiguous capacity rows; against OSQP on the subtour form),
    # and Gaussian utilities flag 0 to 2 rows of 576.
    def finish(it: list[torch.Tensor], only: torch.Tensor
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """The polish of the rows ``only`` (a mask) of the iterates ``it = [z, y, s, λ, zl, zu]``
        that need one (above): returns the iterates, the residual to report, the ambiguity and
        what the backward needs of the state (hh, gl, gu)."""
        z, y, s, lam, zl, zu = it
        hh, rd, rp, rs, gl, gu, rgl, rgu, mu, D, resid = state(theta, scales, z, y, s, lam, zl, zu)
        amb = ambiguity(scales, z, s, lam, zl, zu)
        degen = torch.zeros_like(resid, dtype=torch.bool)
        if not flows:
            degen = only & torch.isfinite(resid) & (resid <= accept) & (amb > _DEGENERATE)
        need = (only & torch.isfinite(resid) & ((resid > accept) | degen)).nonzero()[:, 0]
        if need.numel():
            th, scs = _rows(theta, need), scales[need]
            sc = scs[:, 1]
            start = [v[need] for v in (z, y, s, lam, zl, zu)]
            held = _held_constraints(start, mu[need], T, strict=degen[need])
            # A bound whose gap has reached the rounding floor (x = 1 exactly, where float64 cannot
            # represent gaps below 1.1e-16) leaves its multiplier at mu / tiny, up to 1e290, which the
            # residual hides (it divides by the diagonal zu / gap). The polish's augmented Lagrangian
            # would start from it: such multipliers start at 0 instead (true ones are O(|θ| + |∇f|)).
            start[3:] = [torch.where(v.abs() <= 1e6 * sc[:, None], v, 0.0) for v in start[3:]]
            keep_res, keep = resid[need].clone(), [v.clone() for v in start]

            def rounds(ix: torch.Tensor, held: tuple[torch.Tensor, ...]) -> None:
                """The polish rounds on the rows ``ix`` of ``need``, into keep_res and keep. A row
                leaves once its candidate converged or its active set stopped changing (another
                round would repeat its candidate): each round factors the Newton systems of the
                rows left six times, and rows polished until the last was done cost time on large
                trees (spanning trees n = 26, entropy, t = 0.5, 8 rows: 13.5 s of which the polish
                10.4; with rows leaving 10.3 and 7.8 s, the same residuals, x within 1e-14)."""
                for _ in range(_POLISH_ROUNDS):
                    cand = _polish(th[ix], [v[ix] for v in start], held, T, sf, grad, hess, eps_aux)
                    viol = _violation(cand, T) / scs[ix, 1]
                    clamped = cand[:3] + [v.clamp_min(0.0) for v in cand[3:]]
                    cres = state(th[ix], scs[ix], *clamped)[-1]
                    cres = torch.where(torch.isfinite(viol), torch.maximum(cres, viol), math.inf)
                    take = torch.isfinite(cres) & (cres < keep_res[ix])
                    keep_res[ix] = torch.where(take, cres, keep_res[ix])
                    for kv, cv in zip(keep, clamped):
                        kv[ix[take]] = cv[take]
                    new_held = _reclassify(held, cand, T)
                    changed = torch.zeros_like(cres, dtype=torch.bool)
                    for a, b in zip(new_held, held):
                        changed |= (a != b).any(1)
                    # this round's candidates decide (not the start: tied rows begin below)
                    go = changed & ~(cres <= 10 * tol)
                    if not bool(go.any()):
                        break
                    ix, held = ix[go], tuple(a[go] for a in new_held)

            everyone = torch.arange(need.numel(), device=need.device)
            rounds(everyone, held)
            # stalled rows the polish left above `accept` try once more, holding only the resolved
            # active constraints (spanning trees, the quadratic, tied utilities: 2 of 3 such rows went
            # from 6e-5 to 4e-10)
            again = everyone[(keep_res > accept) & ~degen[need]]
            if again.numel():
                rounds(again, _held_constraints([v[again] for v in start], mu[need][again], T,
                                                strict=torch.ones_like(again, dtype=torch.bool)))
            better = keep_res < resid[need]
            if bool(better.any()):
                rows = need[better]
                z, y, s, lam, zl, zu = [v.clone() for v in (z, y, s, lam, zl, zu)]
                for v, kv in zip((z, y, s, lam, zl, zu), keep):
                    v[rows] = kv[better]
                hh, rd, rp, rs, gl, gu, rgl, rgu, mu, D, resid = state(theta, scales, z, y, s, lam, zl, zu)
                amb = ambiguity(scales, z, s, lam, zl, zu)
                resid[rows] = torch.maximum(resid[rows], keep_res[better])
        return [z, y, s, lam, zl, zu], resid, amb, (hh, gl, gu)

    everywhere = torch.ones(B, dtype=torch.bool, device=device)
    (z, y, s, lam, zl, zu), resid, amb, (hh, gl, gu) = finish([z, y, s, lam, zl, zu], everywhere)
    # Where the best iterate by residual is left unresolved, a later one (and its polish, where it
    # needs one) replaces it if its _key is at least 2x smaller (rounding aside, the two are often
    # one iterate): the last iterate, or the latest within 1e4·accept where that ranks better
    # (a last step can break down: a tied spanning-tree row went from residual 2e-7, x exact, to
    # 8e260). On flow formulations (auxiliary variables) the dual residual of the flows reaches
    # its floor (~1e-8) while weakly active pairs are still ~1e-6 apart, and the polish does not
    # always help (the entropies are not polished there; with the quadratic it cycles between
    # dependent active sets): on spanning trees (n = 6, entropy, t = 0.3, integer utilities) a
    # row was off by 5.9e-5 at residual 7.2e-9 and ambiguity 3e-6, reported converged, and eight
    # iterations later by 3e-9 at residual 1.4e-8. The best by residual goes first because the
    # polish, where it applies, does better from it (a matching's column whose multiplier falls
    # through its slack: exact from there, 9e-8 from the later iterate whose residual has
    # stalled). Stopping stays with the residual alone: the ambiguity of such a column rises as
    # it falls through, and stopping on that left another matching row off by 7e-8 (5e-13 from
    # the iterates that follow). Tracking the best iterate by _key instead, inside the loop,
    # cost 13 % on k-subsets (the ambiguity at every iteration).
    last_key = _key(last_resid, ambiguity(scales, last[0], *last[2:]), tol)
    recent = [torch.where(recent_is_best[:, None], v, w) for v, w in zip(best, recent)]
    recent_key = _key(recent_res, ambiguity(scales, recent[0], *recent[2:]), tol)
    earlier = recent_key < last_key
    last = [torch.where(earlier[:, None], v, w) for v, w in zip(recent, last)]
    last_key = torch.where(earlier, recent_key, last_key)
    best_key = _key(resid, amb, tol)
    switch = torch.isfinite(last_key) & (last_key < 0.5 * best_key)
    if bool(switch.any()):
        cand, cres, camb, cst = finish(last, switch)
        take = switch & torch.isfinite(cres) & (_key(cres, camb, tol) < best_key)
        z, y, s, lam, zl, zu = [torch.where(take[:, None], v, w) for v, w in zip(cand, (z, y, s, lam, zl, zu))]
        hh, gl, gu = [torch.where(take[:, None], v, w) for v, w in zip(cst, (hh, gl, gu))]
        resid = torch.where(take, cres, resid)
    # The backward solves the reduced KKT system of the limit problem: constraints whose slack is
    # (numerically) zero, or whose multiplier exceeds their slack _RESOLVED times, are active
    # and enforced by a penalty, the others are dropped. The slack alone is robust to degenerate
    # multipliers (dependent active constraints, as in flow formulations), where the barrier's own
    # λ/s is not meaningful, but it misses active constraints with small multipliers: the
    # residual bounds the mean complementarity, so one pair's slack can stay at μ_pair/λ ≫ 1e-7
    # (a matching's column at capacity with β = 5e-4: slack 2.6e-7, dropped, gradient off by 0.04).
    # The domain ends of an entropy are never active. Penalty 1e8: accurate to ~1e-8 against
    # finite differences in our tests (larger values lose accuracy in the block factorizations).
    # Under a regularizer with domain ends (the entropies), 1e-8: coordinates at e^(−Δθ), far
    # below the others, bring inactive constraints within 1e-7 (a flow's capacity row whose slack
    # is a sum of them), and holding those left t·grad off by up to 1.1e-6 on spanning trees
    # (n = 6, t = 0.1; against the exact Jacobian of the face, tests/oracles.py face_vjp); the
    # active ones' slacks are far below 1e-8 at convergence (flow-formulation benchmark: rows
    # with t·grad off by more than 1e-6, 70 → 57; largest errors of the untied settings 3-10x
    # smaller). The quadratic keeps 1e-7 (weakly active constraints; unchanged by 1e-8 there).
    thr = 1e-8 if math.isfinite(dlo) or math.isfinite(dhi) else 1e-7
    big = 1e8 if f64 else 1e5
    ratio = _RESOLVED
    # A constraint the polish dropped (multiplier exactly 0, which the interior-point iterates
    # never have) is inactive however small its slack, under a regularizer with domain ends and
    # without auxiliary variables: there a zero multiplier at zero slack would need a sum of
    # exponentials of the utilities to hit a constraint exactly, while tied utilities put
    # inactive ones within 1e-7 (matchings with integer utilities at t = 0.1: columns at slack
    # 8.6e-10 to 6.3e-8, held, left t·grad off by up to 0.46 against Sinkhorn's exact backward in
    # 3 rows of 128). With the quadratic, ties make constraints exactly weakly active and either one-sided
    # derivative is valid; flows are not unique, and a dropped flow bound lets the linearized
    # flow leave P. There the slack alone decides, as before.
    dropped = n == d and (math.isfinite(dlo) or math.isfinite(dhi))
    live_l, live_u = (zl > 0, zu > 0) if dropped else (True, True)
    act = ((hasL & ~T["domL"] & (((gl <= thr) & live_l) | (zl >= ratio * gl)))
           | (hasU & ~T["domU"] & (((gu <= thr) & live_u) | (zu >= ratio * gu))))
    Dback = hh + torch.where(act, torch.full_like(z, big), torch.zeros_like(z))
    Dback = _plus_aux(Dback, d, _AUX_BACKWARD)  # the auxiliary variables' curvature in the backward
    Sback = (torch.where(((s <= thr) & ((lam > 0) if dropped else True)) | (lam >= ratio * s), big, 0.0).to(dtype)
             if p else None)
    report = SolveReport(converged=(resid <= accept) & torch.isfinite(resid), iterations=iters, kkt_residual=resid, tol=tol)
    return z, (Dback, Sback), report


# A complementarity pair is resolved once one side exceeds the other this many times: the
# convergence test makes unresolved pairs converge (a full column of a matching with λ = 6 and
# slack 3e-11 is resolved; one at slack 2e-5 and λ 2e-4, true slack 1e-5, is not), and the
# backward holds a constraint whose multiplier exceeds its slack this many times even when the
# slack is above 1e-7 (a full column with β = 5e-4 kept slack 2.6e-7). At 1 (λ ≥ s) unresolved
# pairs were held wrongly (gradients off by 0.08); at 100, weakly active flow constraints were
# (a spanning-tree gradient entry of -1.1e-5 came out -1.2e-6); 1e4 leaves the convergence table
# of docs/benchmarks.md unchanged and every matching column of the benchmark resolved
_RESOLVED = 1e4
# how much tighter than the residual the largest unresolved pair must be (state()): 100x, and
# this much under a regularizer with domain ends (the entropies) where P has auxiliary variables
# (the flow formulations), the one setting the polish does not reach (see finish()). There an
# active flow bound with a small multiplier stopped at slack 2e-8 (above the backward's 1e-8,
# below _RESOLVED times its multiplier): dropped by the backward, it left the gradient off by up
# to 21 % in 1-2 rows of 64 on correlated k-subsets (n = 30, k = 6, t = 1 and 0.3, both
# entropies; n = 100, t = 1: 3 of 64, up to 39 %), against central differences; at 1e4 the slack
# ends below 1e-8 and those rows are within 1e-4. The term counts at most `accept`: flows are not
# unique, and a pair that never resolves (slack and multiplier both ~sqrt(μ)) would otherwise
# keep its row above `accept` and send it to the polish (correlated k-subsets n = 20: 1.6x the time)
_PEND_WEIGHT_FLOWS = 1e4

# Curvature added to the auxiliary variables in the Newton matrix of rows whose primal residual
# has stalled: not to the objective or the residuals, so the solution is the same; the step then
# leaves a dual residual of _AUX_PROX times the auxiliary variables' own step. With only ε (1e-10)
# on the flows, the normal equations A M⁻¹ Aᵀ mix entries of 1/ε with the 1e-11 of coordinates
# pressed against their bounds (entropies at low temperature), and lost the primal residual: on
# an arborescence (n = 5, entropy, t = 0.1), A Δz missed −(A z − b) by 4e-8 where a dense solve
# of the same system in float64 hit it to 1e-21, and A z − b stayed at 5e-8 for eight iterations
# while the other residuals fell to 1e-15 (reported not converged, x off by 5e-8). Measured over
# spanning trees (n = 6, 8) and arborescences (n = 5, 6) with every regularizer, Gaussian plus
# Gumbel utilities at t ∈ {1, 0.3, 0.1, 0.03} (49 152 rows, against the subtour and cut forms):
# rows reported not converged 140 → 2 (the entropies' 138 → 0; the two left are quadratic, at
# t = 1, as before), rows reported converged but off by more than 1e-8 238 → 69 with the
# entropies; the quadratic's rows never stalled this way and are unchanged, iterations 0.4 %
# fewer. On every row from the start it cost rows at t = 1 accuracy (spanning trees n = 8 with
# the quadratic: 44 → 87 rows of 1024 off by more than 1e-8): their flows, which ε alone pulls
# toward the centre of their degenerate directions, then sat wherever the damped steps left
# them. It was 1e-6 at first; larger flow graphs need more: correlated k-subsets (n = 50, k = 10,
# binary entropy, t ≤ 0.1; 1 700 variables) kept a primal residual of 1-2e-8 with 1e-6 (Newton
# directions missing A Δz = −(A z − b) by about as much), 1 to 3 rows of 256 reported not
# converged, and the rows reported converged off by up to 8e-7 (56 of 128 by more than 1e-7,
# against the same solver at tol 1e-12, which with 1e-6 itself stalled at a median residual of
# 5e-10, and reaches 1e-12 with more). Over correlated k-subsets n ∈ {20, 50, 100}, every
# regularizer, t ∈ {1, 0.1, 0.03} (64 rows each, against tol 1e-12), rows off by more than 1e-8:
# 245 (1e-6), 127 (1e-4), 63 (1e-3), 57 (1e-2); largest error 4.4e-6, 5.1e-7, 1.5e-7, 1.5e-7
# (what is left is the quadratic's, the same at every value); iterations 2.4 % fewer at 1e-3.
# Spanning trees and arborescences are unchanged (the flow-formulation benchmark's counts
# identical but for one row; x within 6e-9). 1e-2 costs rows at t = 1 iterations.
_AUX_PROX = 1e-3

# Curvature added to the auxiliary variables in the backward's system (to their ε = 1e-10). With
# ε alone, the flows' degenerate directions next to the 1e8 penalties of held constraints left
# gradients on flow formulations off by up to 1e-5 (t·grad) at low temperatures, independent of
# the penalty (1e6 to 1e10): an arborescence (n = 5, entropy, t = 0.3, Gumbel utilities) had
# t·grad off by 8e-6 on arcs with x ~ 2e-5 (30 % of their gradient), against the cut form and
# finite differences of this very formulation, which agree. It is the derivative of the problem
# with (ε + 1e-9)/2‖aux‖², whose x differs by O(1e-9). Measured (B = 128 per setting, spanning
# trees n = 6 and 8, arborescences n = 5 and 6, every regularizer, N(0, 1) + Gumbel and integer
# utilities, t ∈ {1, 0.3, 0.1, 0.03}; rows with t·|Δgrad| > 1e-6 against the subtour and cut
# forms): 471 → 437; with the entropies and Gumbel utilities 23 → 3 (at most 2e-6), with tied
# ones 152 → 137; with the quadratic the same but for one row. 1e-8 did as well on the entropies
# but added rows with the quadratic (spanning trees n = 6: 13 → 17 at t = 1); 1e-6 and 1e-4 put
# their own size into the gradients.
_AUX_BACKWARD = 1e-9

# The backward factors its system with this much more curvature on the auxiliary variables and
# takes one step of iterative refinement against the system itself (with _AUX_BACKWARD). Next to
# the 1e8 penalties of held constraints and an entropy's 1/x on coordinates near 0, the flows'
# ε + 1e-9 left the normal equations too ill-conditioned for float64: correlated k-subsets (n = 7,
# k = 2, binary entropy, t = 0.1, Gaussian plus Gumbel utilities) had t·grad off by up to 1.4e-4
# against central differences (13 rows of 64 above 1e-5), and the errors grew as the curvature
# shrank (1e-11: 1e-3). Factored with 1e-7 more, the errors fell to 6e-7, but that curvature
# biased the quadratic's gradients on spanning trees (rows off by more than 1e-6: 10 → 30 of
# 128); the refinement step removes the bias. Measured with benchmarks/flow_formulations.py
# (spanning trees n = 5, 6, arborescences n = 4, 5, every regularizer, Gumbel and integer
# utilities, t ∈ {1, 0.3, 0.1, 0.03}, 128 rows each): rows with t·grad off by more than 1e-6
# 205 → 69 (Gumbel utilities 46 → 1, the quadratic 130 → 1; those left are tied utilities at
# kinks, where the one-sided derivatives differ); a second refinement step changed nothing.
# Without auxiliary variables the refinement step stays (the system is factored as it is): on
# the subtour form of spanning trees n = 8 (254 inequality rows, the quadratic at t = 1,
# N(0, 9) utilities), held rows that depend on each other next to the 1e8 penalties left
# t·grad off by more than 1e-6 on 38 of 128 rows against central differences; with the step, 6
# (central differences of the two forms disagree by that much on 5). The flow form there: 32
# rows before the preconditioner, 2 with it. The built-ins without auxiliary variables (simplex,
# k-subsets, cube, Birkhoff, matchings) were within 1e-7 of their fast paths before and are after.
_AUX_PRECONDITION = 1e-7

# a converged row with an unresolved pair whose slack and multiplier / scale both exceed
# _DEGENERATE is polished (_ipm): its slack may be the error of x
_DEGENERATE = 1e-8

# active-set rounds of the polish: sparse-graph spanning trees (entropy, t = 1) needed 4 on a
# row where 3 left x off by 1.2e-4; the loop ends early once the held set stops changing
_POLISH_ROUNDS = 8


# entries of θ more than this many times the row's median magnitude (plus 1) are far above the
# others: the tolerances of their row are then per coordinate (:func:`_coordinate_scales`). At
# 100, forced entries at u_j + 150 to 200 on the cube (not lowered) left x off by 2.2e-7
_FAR_ABOVE = 10.0
# a coordinate's scale is 1 + this times the magnitudes of its terms. Measured on θ_j = u_j + c
# as given (before such entries were lowered, _forbidden.lower_far_above): flow formulations
# (spanning trees, arborescences) at c = 1e6, whose path multipliers carry c into the auxiliary
# variables: at 1, rows reported converged had x off by up to 8e-6; at 0.1, by up to 8e-7. At
# 1e-3, matchings with the quadratic stalled at 1.5e-7 on 5 rows of 16 at c = 1e9, x right
_TERM_WEIGHT = 0.1
# a batch with at most this many rows not converged solves each of them again alone, and keeps
# the new solution where it converged or its residual is smaller. On flow formulations the
# rows that stall just above `accept` (the dual residual of the flows, while μ falls to 1e-16)
# depend on the rounding of the batched products: spanning trees n = 10, t = 1, 12 batches of
# 128 rows (N(0, 1) + Gumbel), 13 rows did not converge (4 of 1 536 with the entropy, 9 with
# the quadratic, residuals 1.0-4.9e-8); alone, 11 of them converged (to 1e-12, x within 3e-9 of
# the exact fast path where it had been 1e-7 off). Rows with masked entries (`low`) are solved
# again as a batch before (solve_again) and are not retried.
_RETRY_ALONE = 8


def _coordinate_scales(th: torch.Tensor, g: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, zl: torch.Tensor,
                       zu: torch.Tensor, scs: torch.Tensor, T: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per variable ``(B, n)`` and per inequality row ``(B, p)``, the scale its dual residual and
    complementarity are judged against: 1 + a tenth of the magnitudes of the terms of its dual
    residual ``∇f(x) − θ + Aᵀy + Gᵀλ − z_L + z_U`` (its rounding floor is eps times those), clamped
    to ``[lower, upper] = scs.T`` (the scale of θ without and with its entries far above the
    others). An inequality row's scale is ``Σ_j |G_rj| c_j`` over its variables.

    With θ_j = +1e9, x_j is pinned at its bound by a multiplier near 1e9, and that
    coordinate is judged relative to 1e9; the others, whose terms are O(1), relative to 1.
    Including the multiplier in the scale makes a pinned pair's complementarity a test of its gap
    (``gap·z / (1 + 0.1 z) ≈ 10 gap``), which rounding allows down to 1e-16."""
    c = g.abs() + zl + zu
    c[:, : th.shape[1]] += th.abs()
    if T["Aop"].shape[0]:
        c = c + T["Aabs"].adj(y.abs())
    if T["Gop"].shape[0]:
        c = c + T["Gabs"].adj(lam)
    lower, upper = scs[:, :1], scs[:, 1:]
    c = torch.minimum(torch.maximum(1.0 + _TERM_WEIGHT * c, lower), upper)
    cs = torch.minimum(torch.maximum(T["Gabs"].fwd(c), lower), upper) if T["Gop"].shape[0] else c[:, :0]
    return c, cs


def _pending(slack: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """Where neither the slack nor the multiplier is _RESOLVED times the other: the iterations
    have not yet told whether the constraint is active."""
    return (slack <= _RESOLVED * mult) & (mult <= _RESOLVED * slack)


def _unresolved(product: torch.Tensor, slack: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """``slack · mult`` of the :func:`_pending` pairs, else 0."""
    return torch.where(_pending(slack, mult), product, 0.0)


def _ambiguity(slack: torch.Tensor, mult: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``min(slack, mult / scale)`` of the :func:`_pending` pairs, else 0: how far the pair is
    from complementarity (the natural residual ``min(s, λ)``: the change to the slack or to the
    multiplier that makes it exact). The product ``slack · mult`` can be tiny while both are not:
    an active constraint with a small multiplier δ keeps a slack of about δ, which is then the
    error of x."""
    return torch.where(_pending(slack, mult), torch.minimum(slack, mult / scale), 0.0)


def _key(resid: torch.Tensor, amb: torch.Tensor, tol: float) -> torch.Tensor:
    """How the solver ranks two iterates of a row: by the residual once it is within ``tol``,
    else by the larger of the residual and the ambiguity (:func:`_ambiguity`)."""
    return torch.where(resid <= tol, resid, torch.maximum(resid, amb))


def _held_constraints(it: list[torch.Tensor], mu: torch.Tensor, T: dict, strict: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
    """Masks (0/1, the iterates' dtype) of the bounds and inequality rows the polish holds as
    equalities: those whose multiplier exceeds their slack, or whose slack is below 1e3·sqrt(μ)
    (weakly active: slack and multiplier both ~sqrt(μ)); in the ``strict`` rows only those whose
    multiplier exceeds their slack _RESOLVED times. The ends of an open domain never are."""
    z, _, s, lam, zl, zu = it
    near = torch.where(strict, -1.0, 1e3 * mu.clamp_min(0.0).sqrt())[:, None]
    ratio = torch.where(strict, _RESOLVED, 1.0)[:, None]
    gl, gu = z - T["L"], T["U"] - z
    act_l = T["hasL"] & ~T["domL"] & ((zl >= ratio * gl) | (gl <= near))
    act_u = T["hasU"] & ~T["domU"] & ((zu >= ratio * gu) | (gu <= near))
    act_g = (lam >= ratio * s) | (s <= near)
    return tuple(a.to(z.dtype) for a in (act_l, act_u, act_g))


def _reclassify(held: tuple[torch.Tensor, ...], it: list[torch.Tensor], T: dict) -> tuple[torch.Tensor, ...]:
    """One active-set update: drop held constraints whose multiplier is negative, hold dropped
    ones that the polished point violates."""
    z, _, _, lam, zl, zu = it
    act_l, act_u, act_g = (a > 0 for a in held)
    act_l = (act_l & (zl >= 0)) | (~act_l & T["hasL"] & ~T["domL"] & (z < T["L"]))
    act_u = (act_u & (zu >= 0)) | (~act_u & T["hasU"] & ~T["domU"] & (z > T["U"]))
    if T["Gop"].shape[0]:
        act_g = (act_g & (lam >= 0)) | (~act_g & (T["Gop"].fwd(z) > T["h"]))
    return tuple(a.to(z.dtype) for a in (act_l, act_u, act_g))


def _polish(theta: torch.Tensor, it: list[torch.Tensor], held: tuple[torch.Tensor, ...], T: dict,
            sf: StandardForm, grad: Callable[[torch.Tensor], torch.Tensor],
            hess: Callable[[torch.Tensor], torch.Tensor], eps_aux: float, outer: int = 3,
            inner: int = 2) -> list[torch.Tensor]:
    """Active-set Newton polish of interior-point iterates ``it = [z, y, s, λ, zl, zu]`` (rows).

    The constraints in ``held`` (:func:`_held_constraints`) are equalities, enforced by an
    augmented Lagrangian (penalty ρ = 1e4: larger ones amplify the rounding of ``G z − h`` into
    the multipliers), the others dropped: ``outer`` multiplier updates, each after ``inner``
    Newton steps on ``f(x) − θᵀx + ε/2‖aux‖²`` subject to ``A z = b`` (damped to stay inside the
    regularizer's open domain). A proximal term on the auxiliary variables keeps their degenerate
    directions (flows the objective does not determine) where the barrier left them, inside the
    dropped bounds. Returns new iterates, multipliers unclamped (the caller checks them).
    """
    z, y, s, lam, zl, zu = (v.clone() for v in it)
    act_l, act_u, act_g = held
    d = sf.d
    b, hv, Lb, Ub = T["b"], T["h"], T["L"], T["U"]
    Aop, Gop = T["Aop"], T["Gop"]
    m, p = Aop.shape[0], Gop.shape[0]
    rho, prox = 1e4, 1e-2
    dlo, dhi = sf.domain
    hh = torch.full_like(z, eps_aux + prox)
    for _ in range(outer):
        for _ in range(inner):
            x = z[:, :d]
            g = eps_aux * z
            g[:, :d] = grad(x) - theta
            hh[:, :d] = hess(x)
            # the augmented Lagrangian's gradient: ∇f + Aᵀy + Σ_held (multiplier + ρ·violation)·∇c
            g = g - act_l * (zl + rho * (Lb - z)) + act_u * (zu + rho * (z - Ub))
            if p:
                g = g + Gop.adj(act_g * (lam + rho * (Gop.fwd(z) - hv)))
            if m:
                g = g + Aop.adj(y)
            newton = _Newton(T, hh + rho * (act_l + act_u), rho * act_g if p else None)
            dz, dy = newton.solve(-g, (b - Aop.fwd(z)) if m else None)
            # per coordinate, a Newton step that would leave the regularizer's open domain goes 99 %
            # of the way to its end: one step length per row let the coordinates far below the
            # others (an entropy's x ~ 1e-14 on the way to 1e-25) hold every other to 4 % steps
            xn = x + dz[:, :d]
            if math.isfinite(dlo):
                xn = torch.where(xn <= dlo, dlo + 0.01 * (x - dlo), xn)
            if math.isfinite(dhi):
                xn = torch.where(xn >= dhi, dhi - 0.01 * (dhi - x), xn)
            z = torch.cat([xn, z[:, d:] + dz[:, d:]], 1)
            if dy is not None:  # m > 0
                y = y + dy
        zl = act_l * (zl + rho * (Lb - z))
        zu = act_u * (zu + rho * (z - Ub))
        if p:
            lam = act_g * (lam + rho * (Gop.fwd(z) - hv))
    if p:  # held rows are equalities: their slack is 0 and what is left of G z − h a primal residual
        s = torch.where(act_g > 0, 0.0, (hv - Gop.fwd(z)).clamp_min(0.0))
    return [z, y, s, lam, zl, zu]


def _violation(it: list[torch.Tensor], T: dict) -> torch.Tensor:
    """Per row, the largest bound violation, inequality violation or negative multiplier of
    polished iterates (0 when there is none)."""
    z, _, _, lam, zl, zu = it
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    v = torch.maximum(torch.where(T["hasL"], T["L"] - z, zero).amax(1), torch.where(T["hasU"], z - T["U"], zero).amax(1))
    v = torch.maximum(v, torch.maximum((-zl).amax(1), (-zu).amax(1)))
    if T["Gop"].shape[0]:
        v = torch.maximum(v, torch.maximum((-lam).amax(1), (T["Gop"].fwd(z) - T["h"]).amax(1)))
    return v.clamp_min(0.0)


class _TorchSST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, sf, reg, tol, max_iter, holder, forbidden, polytope):
        free = torch.as_tensor(sf.free, device=theta.device)
        th, fb = theta.detach()[:, free], None if forbidden is None else forbidden[:, free]

        def vertex(scores: torch.Tensor) -> torch.Tensor:  # argmax over the free coordinates
            full = scores.new_zeros(scores.shape[0], theta.shape[1])
            full[:, free] = scores
            return polytope._support_argmax(full)[:, free]

        # entries far below the others (a manual mask, u = -1e9) are raised and treated as
        # forbidden, entries far above them (u + 1e9) lowered (tame_extremes; at -1e9 the Newton
        # systems lost x to rounding, off by up to 0.25, at +1e9 by up to 0.4); rows that put mass
        # on the raised ones anyway (every structure uses one) are solved again with them shifted
        # together (solve_again; as given, at -1e9, they did not converge). Offsets
        # along equality rows (θ_ij + r_i on a Birkhoff polytope) are removed too (_remove_offsets).
        tamed, low, out = tame_extremes(th, fb, vertex)
        given = _remove_offsets(tamed, sf, out)
        z, (Dback, Sback), report = _ipm(given, sf, reg, tol, max_iter, out)
        # (and rows that did not converge with such entries: where every structure needs one, the
        # iterates can leave P, and the mass they put on them is no test; Birkhoff n = 3 with a
        # row masked at -1e9 and the quadratic ended at x = ±274, with negative mass there)
        redo = torch.unique(torch.cat([rows_on(z[:, : sf.d], low),
                                       (~report.converged & low.any(1)).nonzero()[:, 0]]))
        if redo.numel():
            fr = None if fb is None else fb[redo]
            z2, (D2, S2), rep2 = _ipm(_remove_offsets(solve_again(th[redo], low[redo], fr), sf, fr),
                                      sf, reg, tol, max_iter, fr)
            z, Dback = z.index_put((redo,), z2), Dback.index_put((redo,), D2)
            Sback = None if Sback is None else Sback.index_put((redo,), S2)
            report = SolveReport(converged=report.converged.index_put((redo,), rep2.converged),
                                 iterations=report.iterations.index_put((redo,), rep2.iterations),
                                 kkt_residual=report.kkt_residual.index_put((redo,), rep2.kkt_residual),
                                 tol=report.tol)
        # rows that did not converge, solved again one at a time (_RETRY_ALONE)
        retry = (~report.converged & torch.isfinite(report.kkt_residual) & ~low.any(1)).nonzero()[:, 0]
        if theta.shape[0] > 1 and 0 < retry.numel() <= _RETRY_ALONE:
            for r in retry.tolist():
                z1, (D1, S1), rep1 = _ipm(given[r:r + 1], sf, reg, tol, max_iter, None if out is None else out[r:r + 1])
                if bool(rep1.converged[0]) or bool(rep1.kkt_residual[0] < report.kkt_residual[r]):
                    z[r], Dback[r] = z1[0], D1[0]
                    if Sback is not None:
                        Sback[r] = S1[0]
                    for key in ("converged", "iterations", "kkt_residual"):
                        getattr(report, key)[r] = getattr(rep1, key)[0]
        holder.append(report)
        ctx.sf = sf
        ctx.save_for_backward(Dback, Sback if Sback is not None else torch.empty(0))
        x = torch.zeros_like(theta)
        x[:, free] = z[:, : sf.d]
        if sf.fixed.size:
            x[:, torch.as_tensor(sf.fixed, device=theta.device)] = torch.as_tensor(sf.fixed_values, dtype=theta.dtype, device=theta.device)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        Dback, Sback = ctx.saved_tensors
        sf = ctx.sf
        free = torch.as_tensor(sf.free, device=g.device)
        T = _tensors(sf, Dback.dtype, Dback.device)
        rhs = torch.zeros_like(Dback)
        rhs[:, : sf.d] = g[:, free]
        Sig = Sback if Sback.numel() else None
        m = T["Aop"].shape[0]
        zero = torch.zeros(g.shape[0], m, dtype=g.dtype, device=g.device) if m else None
        # factor (with _AUX_PRECONDITION more curvature on auxiliary variables), then one step of
        # iterative refinement against the system with Dback itself (_AUX_PRECONDITION)
        newton = _Newton(T, _plus_aux(Dback, sf.d, _AUX_PRECONDITION), Sig)
        dz, dy = newton.solve(rhs, zero)
        r1 = rhs - Dback * dz  # the residual of [[M, Aᵀ], [A, 0]] [dz; dy] = [rhs; 0], M = D + Gᵀ Σ G
        if Sig is not None:
            r1 = r1 - T["Gop"].adj(Sig * T["Gop"].fwd(dz))
        if m:
            r1 = r1 - T["Aop"].adj(dy)
        dz = dz + newton.solve(r1, -T["Aop"].fwd(dz) if m else None)[0]
        out = torch.zeros_like(g)
        out[:, free] = dz[:, : sf.d]
        return out, None, None, None, None, None, None, None


CHUNK_BYTES = 256 * 2**20  # one dense Schur complement of a batch (equality rows² · 8 bytes · rows of the batch)
# ... and on CPU at most this much: a batch's Newton systems then stay near the processor's
# caches. Forward + backward, t = 1, B = 256 (2 cores, 32 MB L3), against 256 MB: correlated
# k-subsets n = 50, k = 10 (1 101 equality rows, banded), entropy 22.9 → 11.9 s, quadratic 19.1 →
# 10.1 s; n = 100 (B = 64) 8.5 → 5.6 s; spanning trees n = 15 (dense, 315 rows) 12.5 → 8.3 s.
# Smaller chunks lose again to the per-iteration overhead (8 MB: 13.8, 8.2 and 12.6 s). On
# CUDA, where large batches fill the device, CHUNK_BYTES alone bounds memory (not measured)
CPU_CHUNK_BYTES = 32 * 2**20


def solve_torch(theta: torch.Tensor, polytope: Polytope, regularizer: Regularizer,
                tol: float | None = None, max_iter: int = 100,
                forbidden: torch.Tensor | None = None) -> tuple[torch.Tensor, SolveReport]:
    """``x = argmax θᵀx − f(x)`` over the polytope for ``theta: (B, *shape)``; returns ``(x, report)``.

    Differentiable in θ (implicit backward). Works on CPU and CUDA; computes in float64 (float32
    inputs are converted and the result cast back). ``forbidden: (B, *shape)`` bool marks the
    entries of θ that are :func:`~convex_sst._forbidden.fill_forbidden`'s stand-in for ``-inf``
    (``relax`` passes it): they start near 0 and do not loosen the tolerances.
    """
    if not regularizer.separable:
        raise InputError(
            f"regularizer {regularizer.name!r} has no elementwise derivatives (grad, hess), which the torch "
            "solver needs; use a fast path or backend='generic'"
        )
    sf = standard_form(polytope, regularizer)
    B = theta.shape[0]
    if sf.d == 0:  # P is one point (k = n, a tree on two vertices): x is fixed and ∂x/∂θ = 0
        x = torch.zeros(polytope.size, dtype=theta.dtype, device=theta.device)
        x[torch.as_tensor(sf.fixed, device=theta.device)] = torch.as_tensor(sf.fixed_values, dtype=theta.dtype,
                                                                           device=theta.device)
        zero = torch.zeros(B, dtype=torch.float64, device=theta.device)
        report = SolveReport(converged=torch.ones(B, dtype=torch.bool, device=theta.device),
                             iterations=torch.zeros(B, dtype=torch.long, device=theta.device), kkt_residual=zero,
                             tol=0.0 if tol is None else tol)
        return (0.0 * theta + x.reshape(theta.shape[1:])), report
    # the batch's dense Schur complements are held at once (several copies: 951 rows at B = 128
    # took 7.2 GB): a large batch of a large system is solved in chunks of bounded memory (banded:
    # the blocks as assembled)
    budget = min(CHUNK_BYTES, CPU_CHUNK_BYTES) if theta.device.type == "cpu" else CHUNK_BYTES
    per = max(1, budget // (8 * (sum(_schur_layout(sf)) + sf.m1 if sf.band else max(1, sf.A.shape[0]) ** 2)))
    if B > per:
        per = -(-B // -(-B // per))  # chunks of equal size: 64 rows at 60 per chunk are 32 + 32, not 60 + 4
        parts = [solve_torch(theta[i:i + per], polytope, regularizer, tol, max_iter,
                             None if forbidden is None else forbidden[i:i + per]) for i in range(0, B, per)]
        reports = [r for _, r in parts]
        return torch.cat([x for x, _ in parts]), SolveReport(
            converged=torch.cat([r.converged for r in reports]), iterations=torch.cat([r.iterations for r in reports]),
            kkt_residual=torch.cat([r.kkt_residual for r in reports]), tol=reports[0].tol)
    # the normal equations of an interior-point method are too ill-conditioned for float32:
    # float32 inputs are solved in float64 and the result cast back
    mask = None if forbidden is None else forbidden.reshape(B, polytope.size)
    flat = polytope._centered(theta.reshape(B, polytope.size).to(torch.float64), mask)
    holder: list[SolveReport] = []
    x = _TorchSST.apply(first_order_guard(flat, "the torch interior-point solver (backend='torch')"), sf, regularizer, tol,
                        max_iter, holder, mask, polytope)
    return x.to(theta.dtype).reshape(theta.shape), holder[0]


def relax_torch(theta: torch.Tensor, polytope: Polytope, reg: Regularizer, tol: float | None = None,
                max_iter: int = 100, on_failure: str = "warn", forbidden: torch.Tensor | None = None,
                **options: Any) -> torch.Tensor:
    """``backend="torch"`` for :func:`~convex_sst.relax`; options: tol, max_iter, on_failure
    (``forbidden``, the mask of ``-inf`` entries, comes from ``relax``, not from users)."""
    if options:  # relax() checks names and values first (check_options)
        raise InputError(f"unknown option(s) {sorted(options)} for the torch backend")
    if on_failure not in ("warn", "raise"):
        raise InputError(f"on_failure must be 'warn' or 'raise', got {on_failure!r}")
    x, report = solve_torch(theta, polytope, reg, tol, max_iter, forbidden)
    bad = ~report.converged
    if forbidden is not None and bool(bad.any()):
        # a row whose every structure needs a forbidden coordinate (its mass there is ≥ ½) need
        # not converge: relax reports it as an InputError next
        bad = bad & ~((x.detach() * forbidden).reshape(x.shape[0], -1).sum(1) > 0.5)
    if bool(bad.any()):
        idx = bad.nonzero().reshape(-1)[:10].tolist()
        msg = (f"torch solver did not converge for batch element(s) {idx} of {theta.shape[0]} "
               f"({polytope!r}, {reg.name!r}): KKT residual up to {report.kkt_residual[bad].max().item():.1e} "
               f"after {int(report.iterations.max())} iterations; the other elements are unaffected")
        if on_failure == "raise":
            raise SolverError(msg)
        warn_user(msg)
    return x
