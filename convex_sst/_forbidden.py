"""Forbidden coordinates: ``u_i = -inf`` in a utility means ``x_i = 0`` in the structure.

Masking logits with ``-inf`` (or with ``torch.finfo(dtype).min``, as ``masked_fill`` idioms do)
restricts the structure to the face ``F = {x in P : x_i = 0 where u_i = -inf}`` of the
polytope, the set of structures that avoid those coordinates: ``relax``, ``argmax`` and the SST
layer then compute ``argmax_{x in F} uᵀx − t f(x)`` and ``argmax_{x in F ∩ 𝒳} uᵀx``.

The solvers never see an infinity. A forbidden coordinate gets a finite utility ``c`` so low
that no structure using it can compete with one that avoids it (:func:`fill_forbidden`), and
the result is checked and set to exactly 0 there (:func:`clear_forbidden`); a row where every
structure needs a forbidden coordinate (the face is empty) is an :class:`InputError`.

Why ``c = −(2 Σ_allowed |u| + 40 (d + 1))`` (``d`` coordinates) is low enough: a 0/1 vertex that
avoids the forbidden coordinates scores at least ``−Σ|u|``, one that uses one at most
``c + Σ|u| < −Σ|u|``, so the linear program (the hard argmax) never picks it. A relaxation moves
a mass δ towards such a vertex only while the regularizer gains more than the utility loses:
the gain is at most about ``d · δ log(1/δ)`` (each of the d coordinates moves by δ off a bound,
where an entropy's slope is ``log(1/δ)``) and the loss at least ``δ · 40 (d + 1)``, so
``δ < e⁻⁴⁰ ≈ 4e-18``. (A margin that does not grow with d is not enough: on a 3×3 Birkhoff face
with a single permutation left, a margin of 64 leaked 1.2e-5 with the binary entropy, the
mass spread around a cycle of six entries.) The quadratic's projection puts exactly 0 there.
Each row is checked.

The same argument turned around covers entries far *above* the others (``u_j + 1e9`` to force a
choice): :func:`lower_far_above` brings them down to where they are only just far above, which
leaves the relaxation unchanged to ``e⁻⁴⁰`` and spares the solvers magnitudes of 1e9. Both in
one row (a choice forced, another masked) hide each other from those two rules; :func:`far_apart`
measures them against the rest instead, where :func:`needed_apart` finds a vertex that has the
forced entries and avoids the masked ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .errors import InputError, SolverError

SLACK = 40.0
"""Per coordinate, the margin below ``−2 Σ|u|`` of the utility given to forbidden coordinates."""
LEAK_TOL = 1e-6
"""A solution whose total mass on forbidden coordinates is below this is accepted (and zeroed)."""


def is_forbidden(u: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the forbidden coordinates: ``u == -inf`` or ``u == finfo(dtype).min``."""
    return u <= torch.finfo(u.dtype).min  # the only values there are -inf and finfo.min


def fill_forbidden(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``theta: (B, *shape)`` with finite allowed entries and forbidden ones (``mask``) set to
    the per-row utility ``c = −(2 Σ_allowed |θ| + SLACK (d + 1))`` (constant: no gradient flows
    there); ``d`` is the number of coordinates."""
    B = theta.shape[0]
    allowed = torch.where(mask, 0.0, theta.detach().abs()).reshape(B, -1)
    c = -(2.0 * allowed.sum(1) + SLACK * (allowed.shape[1] + 1))
    c = c.clamp_min(-torch.finfo(theta.dtype).max / 4)  # |u| near the dtype's limit: clear_forbidden checks
    return torch.where(mask, c.reshape((B,) + (1,) * (theta.dim() - 1)), theta)


def far_below(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, level)``: the entries of ``theta: (B, d)`` that lie as far below the others as
    :func:`fill_forbidden`'s stand-in, ``θ_j ≤ level = −(2 Σ|θ_k| + SLACK (d + 1))`` with the
    sum over the entries that are not, and that level per row ``(B,)``. By the argument above,
    a relaxation puts less than ``e⁻⁴⁰`` on such entries whether they are at the level or
    anywhere below it: they are forbidden in all but name (a manual ``masked_fill(mask, -1e9)``).
    The interior-point and generic solvers raise them to the level (and check that no row puts
    mass on them, which happens when every structure needs one); Sinkhorn makes them kernel zeros."""
    B, d = theta.shape
    if not bool((theta.detach() <= -SLACK * (d + 1)).any()):  # the level is below that: the common case
        return torch.zeros_like(theta, dtype=torch.bool), theta.new_zeros(B)
    th, order = theta.detach().sort(dim=1, descending=True)
    above = torch.cat([torch.zeros_like(th[:, :1]), th.abs().cumsum(1)[:, :-1]], 1)
    levels = -(2.0 * above + SLACK * (d + 1))
    # once an entry is far below the ones above it, so is every smaller one (cummax); the level
    # is the one at the first of them (the sums past it would count it)
    low = (th <= levels).to(torch.uint8).cummax(1).values.bool()
    first = (~low).sum(1, keepdim=True).clamp_max(d - 1)
    level = levels.gather(1, first)[:, 0]
    return torch.zeros_like(low).scatter(1, order, low), level


def avoidable_below(theta: torch.Tensor, argmax: Callable[[torch.Tensor], torch.Tensor],
                    exclude: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`far_below`'s entries of ``theta: (B, d)`` (``exclude``: forbidden stand-ins, left
    out of it) in the rows where some structure avoids them all, found with ``argmax`` (0/1
    vertices ``(R, d)``): by the argument above, the argmax of such a row uses none of them.
    Where every structure needs some, the relaxation puts mass on them: they are not negligible,
    and none is returned. Logits far below zero at low temperature (``u − 1e4``, or
    log-probabilities over t = 1e-3) make every entry "far below" in absolute terms, and the
    Newton paths, which measured their span and tolerance without them, returned infeasible
    points (Birkhoff, matchings, DAG paths: x off by up to 1.0)."""
    probe = theta.detach() if exclude is None else theta.detach().masked_fill(exclude, 0.0)
    low = far_below(probe)[0]
    if exclude is not None:
        low = low & ~exclude
    rows = low.any(1).nonzero()[:, 0]
    if rows.numel():
        vertex = argmax(theta.detach()[rows].to(torch.float64)).to(low.device) > 0.5
        needed = rows[(vertex & low[rows]).any(1)]
        low = low.index_fill(0, needed, False)
    return low


def raise_far_below(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raised, low)``: ``theta: (B, d)`` with its :func:`far_below` entries (``low``) raised to
    their row's level. Exact while some structure avoids them all; a solver checks that with
    :func:`rows_on` and solves the rows it names again as given."""
    low, level = far_below(theta)
    return torch.where(low, level[:, None], theta), low


def shift_far_below(theta: torch.Tensor, low: torch.Tensor, forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """``theta: (B, d)`` with its ``low`` entries (far below the others) raised together, by one
    constant per row (no gradient), to where the highest of them is only just far below the
    rest R: ``max_low θ = −(2 Σ_R |θ| + d·s + SLACK (d + 1))``, s the spread of the low entries;
    ``forbidden`` entries (stand-ins, left out of R) refilled for the new values.

    For the rows where every structure needs some low entries (a manual mask at -1e9 that leaves
    no structure; :func:`raise_far_below`'s level is exact only where one avoids them all): the
    relaxation lives, to ``e⁻⁴⁰``, on the vertices with the fewest low entries (by the argument
    of :func:`lower_far_above`: one more costs at least ``SLACK (d + 1)``), and a common shift
    moves all of their scores by the same amount, so it leaves it unchanged. Solved as given, at
    -1e9, the interior-point solver did not converge (Birkhoff n = 3, quadratic, t = 0.05:
    residual 4e2) and cvxpylayers returned infeasible points or x off by up to 0.7 (matchings).
    Low entries that are far apart among themselves (-1e9 and -2e9) keep their spread."""
    B, d = theta.shape
    th = theta.detach()
    rest = ~low if forbidden is None else ~(low | forbidden)
    mag = torch.where(rest, th.abs(), 0.0).sum(1)
    top = torch.where(low, th, -torch.inf).amax(1)
    bottom = torch.where(low, th, torch.inf).amin(1)
    spread = torch.where(low.any(1), top - bottom, 0.0)
    level = -(2.0 * mag + d * spread + SLACK * (d + 1))
    shift = torch.where(low.any(1) & (top < level), level - top, 0.0)
    raised = theta + torch.where(low, shift[:, None], 0.0)
    if forbidden is None or not bool(forbidden.any()):
        return raised
    return fill_forbidden(raised, forbidden)


def solve_again(theta: torch.Tensor, low: torch.Tensor, forbidden: torch.Tensor | None) -> torch.Tensor:
    """What the interior-point and generic solvers solve for the rows of ``theta: (B, d)`` that
    put mass on :func:`tame_extremes`'s ``low`` entries anyway (every structure uses one): the
    entries far above the others lowered (:func:`lower_far_above`, forbidden ones refilled), the
    ``low`` ones shifted together (:func:`shift_far_below`)."""
    return shift_far_below(lower_far_above(theta, forbidden, refill=True), low, forbidden)


def lower_far_above(theta: torch.Tensor, exclude: torch.Tensor | None = None, refill: bool = False) -> torch.Tensor:
    """``theta: (B, d)`` with its entries far above the others (``u_j + 1e9`` to force a choice)
    lowered, per row, by one constant (no gradient), to where they are only just far above.

    The top k entries F of a row, with spread ``s = max_F θ − min_F θ``, are far above the rest R
    when ``min_F θ > L = 2 Σ_R |θ| + d·s + SLACK (d + 1)`` (``exclude``: forbidden entries and
    entries far below the others, left out of the sum and never in F). By the argument of the
    module docstring, turned around, a 0/1 vertex with fewer coordinates in F than the most any
    vertex has then scores at least ``SLACK (d + 1)`` below one with the most (F's entries beat
    R's by more than ``2 Σ_R |θ|``, their spread costs at most ``(d − 1)·s``), so a relaxation
    puts less than ``e⁻⁴⁰`` on it, at min_F θ = L or anywhere above; and vertices with equally
    many keep their differences. So F is lowered until ``min_F θ = L``, for the k (if any)
    that leaves the smallest max θ. Left at 1e9, the entries cost the interior-point solver x to
    rounding: its flow formulations lost x by up to 0.4 (spanning trees, arborescences).

    The argument needs the excluded entries to be negligible: a caller whose rows may need them
    (every structure uses one) checks that afterwards and solves those rows again as given.
    ``refill=True`` (excluded entries already set to one level by :func:`raise_far_below` or
    :func:`fill_forbidden`) sets them, in the rows lowered, to that level for the lowered
    values: computed from the entries at 1e9, they sat near −4e9, and the flow formulations
    lost x to them the same way (spanning trees with masks and forced edges: 3 rows of 8 warned
    about; arborescences: x off by 4.7e-8)."""
    B, d = theta.shape
    th = theta.detach()
    if d < 2 or not bool((th >= SLACK * (d + 1)).any()):  # L is at least that: the common case
        return theta
    vals = th if exclude is None else th.masked_fill(exclude, -torch.inf)
    srt, order = vals.sort(dim=1, descending=True)
    mags = torch.where(torch.isfinite(srt), srt.abs(), 0.0)
    rest = mags.sum(1, keepdim=True) - mags.cumsum(1)[:, :-1]        # Σ_R |θ| for F = top k, k = 1..d-1
    low = srt[:, :-1]                                               # min_F θ
    spread = srt[:, :1] - low
    level = 2.0 * rest + d * spread + SLACK * (d + 1)
    ok = torch.isfinite(low) & (low > level)
    if not bool(ok.any()):
        return theta
    top = torch.where(ok, spread + level, torch.inf).argmin(1, keepdim=True)   # k − 1
    shift = torch.where(ok.gather(1, top), (low - level).gather(1, top), 0.0)  # (B, 1)
    in_f = torch.zeros_like(th, dtype=torch.bool).scatter(
        1, order, torch.arange(d, device=th.device).expand(B, d) <= top)
    lowered = theta - torch.where(in_f, shift, 0.0)
    if not refill or exclude is None:
        return lowered
    return torch.where(exclude & (shift > 0), fill_forbidden(lowered, exclude), lowered)


def far_apart(theta: torch.Tensor, forbidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(low, high)``: entries of ``theta: (B, d)`` far below and far above the rest together
    (a choice forced by ``+1e9`` and a manual mask at ``-1e9`` in one row), or None when no row
    has both. :func:`far_below` and :func:`lower_far_above` each measure their entries against
    all the others, so each misses them there: neither -1e9 is far below a row holding 1e9, nor
    the reverse.

    The rest M are the entries of smallest magnitude; the others E (``forbidden`` left out) are
    far apart from M when each ``|θ_j| > T = 2 Σ_M |θ| + d·s + SLACK (d + 1)`` (``s``: the spread
    of E's positive entries), for the largest M that leaves E both signs. With ``low`` (E's
    negative entries) and ``high`` (its positive ones) and a vertex v* that has the most
    coordinates in ``high`` any vertex has and none in ``low``: a vertex with fewer in ``high``
    scores at least ``SLACK (d + 1)`` below v* (the argument of :func:`lower_far_above`; entries
    of ``low`` only lower it), one with as many but some in ``low`` too (that of
    :func:`far_below`, its loss in ``high`` at most ``d·s``). So the relaxation lives, to
    ``e⁻⁴⁰``, on the vertices like v*, where ``low`` is not used and ``high`` adds a constant,
    the same whatever the magnitudes beyond T; :func:`needed_apart` checks that v* exists.
    Without it, the balance of ``high`` against ``low`` decides (``2e9`` forcing an arc that
    needs one at ``-1e9``), and the entries are left as given."""
    B, d = theta.shape
    th = theta.detach()
    big = SLACK * (d + 1)
    if d < 2 or not bool((th >= big).any()):  # T is at least that: the common case
        return None
    mag = th.abs() if forbidden is None else th.abs().masked_fill(forbidden, torch.inf)
    if not bool(((th <= -big) & torch.isfinite(mag)).any()):
        return None
    srt, order = mag.sort(dim=1)                                  # ascending; forbidden entries last
    val = th.gather(1, order)
    finite = torch.isfinite(srt)
    csum = torch.where(finite, srt, 0.0).cumsum(1)
    below = torch.cat([torch.zeros_like(csum[:, :1]), csum[:, :-1]], 1)   # Σ_M |θ| for M = the first m
    pos, neg = finite & (val > 0), finite & (val < 0)
    min_pos = torch.where(pos, val, torch.inf).flip(1).cummin(1).values.flip(1)   # E's smallest positive
    max_pos = torch.where(pos, val, -torch.inf).amax(1, keepdim=True)
    spread = torch.where(torch.isfinite(min_pos), max_pos - min_pos, 0.0)
    level = 2.0 * below + d * spread + big
    both = neg.flip(1).cummax(1).values.flip(1) & pos.flip(1).cummax(1).values.flip(1)
    ok = finite & (srt > level) & both
    if not bool(ok.any()):
        return None
    idx = torch.arange(d, device=th.device).expand(B, d)
    first = torch.where(ok, idx, -1).amax(1, keepdim=True)       # the largest M: -1 where none
    in_e = (first >= 0) & (idx >= first)
    unsort = torch.empty_like(order).scatter_(1, order, idx)
    return (in_e & neg).gather(1, unsort), (in_e & pos).gather(1, unsort)


def needed_apart(theta: torch.Tensor, forbidden: torch.Tensor | None, argmax: Callable[[torch.Tensor], torch.Tensor],
                 known: torch.Tensor | None = None) -> torch.Tensor | None:
    """The :func:`far_apart` ``low`` entries of ``theta: (B, d)``, in the rows where some are
    not ``known`` (:func:`far_below`'s, for callers that handle those) and a vertex v* exists
    (most coordinates in ``high``, none in ``low``, none forbidden): found with ``argmax`` (0/1
    vertices ``(R, d)`` of scores ``(R, d)``) of small integer scores that rank the vertices in
    that order. None when there are none; the callers treat them as far below
    (:func:`tame_extremes`, :func:`lower_forced`, Sinkhorn's kernel zeros)."""
    apart = far_apart(theta, forbidden)
    if apart is None:
        return None
    low, high = apart
    rows = (low if known is None else low & ~known).any(1).nonzero()[:, 0]
    if not rows.numel():
        return None
    d = theta.shape[1]
    score = (d + 1.0) * high[rows] - 1.0 * low[rows]
    if forbidden is not None:
        score = score - (d + 1.0) ** 2 * forbidden[rows]
    v = argmax(score.to(torch.float64)).to(theta.device) > 0.5
    rows = rows[~(v & low[rows]).any(1)]
    if not rows.numel():
        return None
    return torch.zeros_like(low).index_put((rows,), low[rows])


def lower_forced(theta: torch.Tensor, forbidden: torch.Tensor | None,
                 argmax: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """:func:`lower_far_above` for the fast paths that take entries far below the others as they
    are (exp-family marginals in log space: their weight underflows to 0, as it should):
    ``forbidden`` stand-ins and the :func:`needed_apart` entries are left out of the rule."""
    apart = needed_apart(theta.detach(), forbidden, argmax)
    if apart is not None:
        forbidden = apart if forbidden is None else forbidden | apart
    return lower_far_above(theta, forbidden)


def tame_extremes(theta: torch.Tensor, forbidden: torch.Tensor | None = None,
                  argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tamed, low, excluded)``: what the interior-point and generic solvers solve for
    ``theta: (B, d)`` (``forbidden``: the stand-ins for -inf). Entries far below the others
    (``low``, a manual mask at -1e9) are raised to their level (:func:`raise_far_below`), entries
    far above them (``u + 1e9`` forcing a choice) lowered (:func:`lower_far_above`, the raised
    and forbidden ones refilled); ``excluded`` is ``low | forbidden``. At ±1e9 as given, the
    solvers lost x to rounding (the torch solver's flow formulations by up to 0.4, cvxpylayers by
    up to 0.6). Exact while some structure avoids the ``low`` entries: the caller checks that
    with :func:`rows_on` and solves those rows again as given, with only the forbidden entries
    excluded (``lower_far_above(theta, forbidden, refill=True)``). With ``argmax`` (the
    polytope's, on rows ``(R, d)``), entries far below the others once those far above are left
    out (:func:`needed_apart`) count in ``low`` too."""
    raised, low = raise_far_below(theta)
    apart = None if argmax is None else needed_apart(theta, forbidden, argmax, known=low)
    if apart is not None:
        low = low | apart
    excluded = low if forbidden is None else forbidden | low
    if apart is not None:  # to one level now; lower_far_above refills them for the lowered values
        raised = torch.where(apart, fill_forbidden(raised, excluded), raised)
    return lower_far_above(raised, excluded, refill=True), low, excluded


def rows_on(x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``x: (B, d)`` that put more than :data:`LEAK_TOL` on ``low``."""
    return ((x.detach() * low).sum(1) > LEAK_TOL).nonzero()[:, 0]


def empty_face_error(rows: torch.Tensor, batch: tuple[int, ...], polytope: object, argname: str) -> InputError:
    """The error for rows in which every structure of ``polytope`` uses a forbidden coordinate."""
    first = int(rows[0])
    idx = tuple(int(i) for i in np.unravel_index(first, batch)) if batch else ()
    total = int(np.prod(batch)) if batch else 1
    return InputError(
        f"no structure of {polytope!r} avoids the coordinates where {argname} = -inf, at batch index {idx} "
        f"({rows.numel()} of {total} structures affected): -inf forbids a coordinate (x = 0 there), and every "
        f"structure uses one of these. Hint: leave enough coordinates finite, e.g. at least k items for a "
        f"k-subset, a connected graph of allowed edges for a spanning tree"
    )


def _face_is_empty(polytope: object, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows (of those marked in ``rows``, at most 10) whose face ``{x in P : x = 0 where mask}``
    is empty, by an LP each (error path only). On an integral P a row that must leak puts at
    least ½ there (a structure's 1); a polytope that is not integral can need any fraction (a
    user's config: every point of P has x_j ≥ 0.3), which is no solver failure either."""
    out = torch.zeros_like(rows)
    lp = getattr(polytope, "lp", None)
    if lp is None:
        return out
    flat = mask.reshape(mask.shape[0], -1).cpu().numpy()
    for b in rows.nonzero().reshape(-1)[:10].tolist():
        upper = np.where(flat[b], 0.0, lp.form.ub[: flat.shape[1]])
        out[b] = not lp.is_feasible(upper=upper)
    return out


def clear_forbidden(x: torch.Tensor, mask: torch.Tensor, batch: tuple[int, ...], polytope: object,
                    argname: str = "u") -> torch.Tensor:
    """Check that ``x: (B, *shape)`` puts (almost) no mass on forbidden coordinates and zero them.

    Raises :class:`InputError` for rows whose face is empty (mass at least ½: every 0/1 point
    of P there has a forbidden coordinate equal to 1) and :class:`SolverError` for any other
    leak above :data:`LEAK_TOL` (a solver that did not separate them).
    """
    B = x.shape[0]
    leak = torch.where(mask, x.detach().abs(), 0.0).reshape(B, -1).sum(1)
    if not bool((leak <= LEAK_TOL).all()):  # NaN included
        empty = (leak > 0.5) | _face_is_empty(polytope, mask, (leak > LEAK_TOL) & (leak <= 0.5))
        empty = empty.nonzero().reshape(-1)
        if empty.numel():
            raise empty_face_error(empty, batch, polytope, argname)
        bad = (~(leak <= LEAK_TOL)).nonzero().reshape(-1)
        raise SolverError(
            f"the solution for {polytope!r} puts mass {leak[bad].max().item():.1e} on coordinates where {argname} = -inf "
            f"(batch element(s) {bad[:10].tolist()} of {B}); they should be 0. Hint: use a larger temperature "
            f"or backend='generic'"
        )
    return x.masked_fill(mask, 0.0)
