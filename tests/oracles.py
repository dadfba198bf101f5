"""Independent reference implementations used by the tests (numpy / plain cvxpy / mpmath, no library code)."""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np


def softmax(theta: np.ndarray) -> np.ndarray:
    z = np.exp(theta - theta.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def sparsemax(theta: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex (Martins & Astudillo 2016), one vector."""
    z = np.sort(theta)[::-1]
    cs = np.cumsum(z)
    k = np.arange(1, len(z) + 1)
    support = z - (cs - 1) / k > 0
    kk = k[support][-1]
    tau = (cs[kk - 1] - 1) / kk
    return np.maximum(theta - tau, 0)


def lml(theta: np.ndarray, k: int, iters: int = 200) -> np.ndarray:
    """argmax θᵀx − Σ binary entropy s.t. Σx = k: x = σ(θ − τ), τ by bisection."""
    lo, hi = theta.min() - 50, theta.max() + 50
    for _ in range(iters):
        tau = 0.5 * (lo + hi)
        s = (1 / (1 + np.exp(-(theta - tau)))).sum()
        lo, hi = (tau, hi) if s > k else (lo, tau)
    return 1 / (1 + np.exp(-(theta - 0.5 * (lo + hi))))


def sinkhorn(theta: np.ndarray, tol: float = 1e-13, max_iters: int = 200_000) -> np.ndarray:
    """argmax <θ, X> + H(X) over doubly stochastic X: Sinkhorn scaling of exp(θ) in log space."""
    logk = theta.copy()
    for _ in range(max_iters):
        logk = logk - np.logaddexp.reduce(logk, axis=1, keepdims=True)
        logk = logk - np.logaddexp.reduce(logk, axis=0, keepdims=True)
        if np.abs(np.exp(logk).sum(1) - 1).max() < tol:
            break
    return np.exp(logk)


def subtour_spanning_tree(theta: np.ndarray, n: int, regularizer: str) -> np.ndarray:
    """Solve the SST over Kₙ's spanning-tree polytope in its 2ⁿ subtour form with plain cvxpy."""
    edges = list(itertools.combinations(range(n), 2))
    x = cp.Variable(len(edges))
    cons = [cp.sum(x) == n - 1, x >= 0, x <= 1]
    for size in range(2, n):
        for S in itertools.combinations(range(n), size):
            idx = [e for e, (i, j) in enumerate(edges) if i in S and j in S]
            cons.append(cp.sum(x[idx]) <= size - 1)
    f = {
        "entropy": -cp.sum(cp.entr(x)),
        "binary_entropy": -cp.sum(cp.entr(x)) - cp.sum(cp.entr(1 - x)),
        "quadratic": 0.5 * cp.sum_squares(x),
    }[regularizer]
    prob = cp.Problem(cp.Maximize(theta @ x - f), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return np.asarray(x.value)


def f_value(x: np.ndarray, regularizer: str) -> np.ndarray:
    """Regularizer values for rows of x (numpy, with 0 log 0 = 0)."""
    def xlogx(v):
        v = np.clip(v, 0, None)
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1)), 0.0)

    if regularizer == "entropy":
        return xlogx(x).sum(-1)
    if regularizer == "binary_entropy":
        return (xlogx(x) + xlogx(1 - x)).sum(-1)
    if regularizer == "quadratic":
        return 0.5 * (x * x).sum(-1)
    raise KeyError(regularizer)


def near_uniform_arborescence(theta: np.ndarray, root: int, regularizer: str, iters: int = 200) -> np.ndarray:
    """``argmax θᵀx − f(x)`` over arborescences rooted at ``root`` for nearly uniform ``θ`` (n, n),
    ``f`` the entropy or ½‖x‖², by the closed form of the relaxation that keeps only the in-degree
    equalities and the root's cut ``Σ_m x[root, m] ≥ 1``: every column a softmax (sparsemax) of
    ``θ[:, m] + κ e_root`` over the parents h ≠ m, κ = 0 if the cut holds there, else κ > 0 by
    bisection so that it holds with equality. Near the uniform point this relaxation is the
    polytope (the other cuts ``x(δ⁻(S)) ≥ 1``, 2 ≤ |S| ≤ n − 2, are slack by a margin): the
    caller checks that with :func:`arborescence_cut_slack`."""
    n = theta.shape[0]
    column = softmax if regularizer == "entropy" else sparsemax

    def x_of(kappa: float) -> np.ndarray:
        x = np.zeros((n, n))
        for m in range(n):
            if m == root:
                continue
            hs = [h for h in range(n) if h != m]
            v = theta[hs, m].copy()
            v[hs.index(root)] += kappa
            x[hs, m] = column(v)
        return x

    def cut(kappa: float) -> float:
        return x_of(kappa)[root].sum() - 1.0

    if cut(0.0) >= 0:
        return x_of(0.0)
    lo, hi = 0.0, 1.0
    while cut(hi) < 0:
        hi *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cut(mid) < 0 else (lo, mid)
    return x_of(hi)


def arborescence_cut_slack(x: np.ndarray, root: int) -> float:
    """The smallest ``x(δ⁻(S)) − 1`` over vertex sets S without the root, 2 ≤ |S| ≤ n − 2."""
    n = x.shape[0]
    others = [v for v in range(n) if v != root]
    worst = np.inf
    for k in range(2, n - 1):
        for S in itertools.combinations(others, k):
            inside = np.zeros(n, dtype=bool)
            inside[list(S)] = True
            worst = min(worst, x[~inside][:, inside].sum() - 1.0)
    return worst


def hull_solve(V: np.ndarray, theta: np.ndarray, reg: str) -> np.ndarray:
    """The SST over conv(V) in V-representation with plain cvxpy: independent of our constraints.

    Coordinates that are equal on every vertex (an arborescence's arcs into the root) are fixed at
    that value and left out of the program: they add a constant to the objective, and at 0 they
    would put the optimum on the boundary of the entropy's domain, where the interior-point solver
    only reports an inaccurate solution.
    """
    free = V.min(0) != V.max(0)
    x_full = V[0].astype(float).copy()
    if not free.any():
        return x_full
    lam = cp.Variable(len(V), nonneg=True)
    x = V[:, free].T @ lam
    theta = theta[free]
    f = {
        "entropy": -cp.sum(cp.entr(x)),
        "binary_entropy": -cp.sum(cp.entr(x)) - cp.sum(cp.entr(1 - x)),
        "quadratic": 0.5 * cp.sum_squares(x),
    }[reg]
    cp.Problem(cp.Maximize(theta @ x - f), [cp.sum(lam) == 1]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    x_full[free] = V[:, free].T @ lam.value
    return x_full


def hull_projection(V: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``argmin_{x ∈ conv(V)} ½‖x − θ‖²`` to rounding. Plain cvxpy in V-representation first
    (Clarabel alone was off by up to 2e-5 where structures tie: integer utilities); then the
    optimal face, the vertices that maximize ``(θ − x)ᵀv`` to 1e-4, and the nearest point of
    its affine hull (least squares), kept if an LP finds it in the face's hull and its
    optimality gap ``max_v (θ − x)ᵀ(v − x)`` is at rounding."""
    from scipy.optimize import linprog

    lam = cp.Variable(len(V), nonneg=True)
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(V.T @ lam - theta)), [cp.sum(lam) == 1]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    x = V.T @ np.asarray(lam.value)
    scores = V @ (theta - x)
    S = V[scores >= scores.max() - 1e-4 * (1 + np.abs(theta - x).max())]
    if len(S) == 1:
        return S[0].astype(float)
    D = (S[1:] - S[0]).T
    polished = S[0] + D @ np.linalg.lstsq(D, theta - S[0], rcond=None)[0]
    inside = linprog(np.zeros(len(S)), A_eq=np.vstack([S.T, np.ones(len(S))]), b_eq=np.append(polished, 1.0),
                     bounds=(0, None), method="highs")
    g = theta - polished
    if inside.status == 0 and (V @ g).max() - g @ polished < 1e-12 * (1 + np.abs(g).sum()):
        return polished
    return x


# x = clip(ψ(v), 0, 1) with ψ = (f')⁻¹ per regularizer (the entropy's f' = log x + 1)
_PSI = {
    "entropy": lambda v: np.minimum(1.0, np.exp(np.minimum(v - 1.0, 50.0))),
    "binary_entropy": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "quadratic": lambda v: np.clip(v, 0.0, 1.0),
}


def _decreasing_root(h, lo: float, hi: float) -> float:
    """The root of a nonincreasing h on [lo, hi] (h(lo) > 0 >= h(hi)) by bisection, to the last bit."""
    while True:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            return mid
        lo, hi = (mid, hi) if h(mid) > 0 else (lo, mid)


def group_capped_subset(theta: np.ndarray, groups: list[int], cap: list[int], k: int, reg: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """argmax θᵀx − f(x) s.t. Σx = k, Σ_{i in g} x_i <= cap[g], 0 <= x <= 1 (one vector); returns
    x and the caps' multipliers λ.

    KKT: x_i = clip(ψ(θ_i − τ − λ_g), 0, 1) with λ_g >= 0 the multiplier of group g's cap: for a
    given τ each group is either under its cap at λ_g = 0 or at it, λ_g by bisection; τ by an
    outer bisection on Σx = k (both sums are nonincreasing in their argument)."""
    psi, groups = _PSI[reg], np.asarray(groups)
    span = 100.0 + np.abs(theta).max()

    def at(tau: float) -> tuple[np.ndarray, np.ndarray]:
        x, lams = np.empty_like(theta), np.zeros(len(cap))
        for g, c in enumerate(cap):
            v = theta[groups == g] - tau
            if psi(v).sum() > c:
                lams[g] = _decreasing_root(lambda lam: psi(v - lam).sum() - c, 0.0, 2 * span)
            x[groups == g] = psi(v - lams[g])
        return x, lams

    return at(_decreasing_root(lambda tau: at(tau)[0].sum() - k, -2 * span, 2 * span))


def quadratic_on_form(theta: np.ndarray, form) -> np.ndarray:
    """argmax θᵀx − ½‖x‖² over ``form`` (a CanonicalForm without auxiliary variables) with plain
    cvxpy and OSQP: its active-set polish makes the answer exact where the problem is degenerate
    (tied utilities), where interior-point solvers stop at ~1e-7."""
    x = cp.Variable(form.num_z)
    cons = [x >= form.lb, x <= form.ub]
    if form.num_eq:
        cons.append(form.A_eq.toarray() @ x == form.b_eq)
    if form.num_ub:
        cons.append(form.A_ub.toarray() @ x <= form.b_ub)
    cp.Problem(cp.Maximize(theta @ x - 0.5 * cp.sum_squares(x)), cons).solve(
        solver=cp.OSQP, eps_abs=1e-12, eps_rel=1e-12, polishing=True, max_iter=400_000)
    return np.asarray(x.value)


def face_vjp(z: np.ndarray, w: np.ndarray, form, hinv: np.ndarray | None = None, tol: float = 1e-9) -> np.ndarray:
    """``Jᵀw`` of ``x = argmax θᵀx − f(x)`` over ``form`` (a CanonicalForm without auxiliary
    variables) at its solution ``z``, for a separable f with ``1 / f''(z) = hinv`` (None: the
    quadratic, ``x = proj_P(θ)``): away from ties, ``J = H^{-1/2} Π H^{-1/2}`` with Π the
    orthogonal projection onto the null space of ``C H^{-1/2}``, C the constraints active at z
    (the equalities, and the inequality rows and bounds within ``tol``; a bound where ``hinv``
    is 0, an entropy's domain end, never), by an SVD, so dependent active rows (degenerate
    faces, as on the spanning-tree polytope) are no difficulty. Independent of any solver's
    backward."""
    h = np.ones_like(z) if hinv is None else hinv
    rows = [form.A_eq.toarray()] if form.num_eq else []
    if form.num_ub:
        G = form.A_ub.toarray()
        rows.append(G[form.b_ub - G @ z < tol])
    eye = np.eye(len(z))
    rows += [eye[(z - form.lb < tol) & (h > 0)], eye[(form.ub - z < tol) & (h > 0)]]
    C = np.concatenate([r for r in rows if r.size], 0) * np.sqrt(h)[None, :]
    _, sv, Vt = np.linalg.svd(C)
    N = Vt[int((sv > 1e-12 * sv[0]).sum()):].T
    return np.sqrt(h) * (N @ (N.T @ (np.sqrt(h) * w)))


def subtour_tree_config(n: int) -> str:
    """The spanning trees of K_n in their subtour form, as a polytope config (YAML text): Σx = n − 1,
    0 ≤ x ≤ 1, at most |S| − 1 edges inside every vertex subset S; edges i < j in lexicographic
    order, as the built-in ``spanning_tree``. No auxiliary variables (the built-in is a flow
    formulation), so a second, independent formulation of the same polytope."""
    edges = list(itertools.combinations(range(n), 2))
    rows = [" + ".join(f"x[{e}]" for e, (a, b) in enumerate(edges) if a in S and b in S) + f" <= {size - 1}"
            for size in range(2, n) for S in itertools.combinations(range(n), size)]
    return (f"name: subtour_tree\noutput: {{name: x, shape: [{len(edges)}]}}\nconstraints:\n"
            f"  - sum(x) == {n - 1}\n  - 0 <= x <= 1\n" + "".join(f"  - {r}\n" for r in rows)
            + "regularizers: [entropy, binary_entropy, quadratic]\n")


def cut_arborescence_config(n: int) -> str:
    """The arborescences of K_n rooted at 0 in Edmonds' cut form, as a polytope config (YAML
    text): in-degree 1 off the root, at least one arc into every vertex set without the root;
    ``x[h, m]`` for the arc h → m, as the built-in ``arborescence``. No auxiliary variables."""
    lines = ["  - 0 <= x <= 1"] + [f"  - x[{v}, {v}] == 0\n  - x[{v}, 0] == 0" for v in range(n)]
    lines += ["  - " + " + ".join(f"x[{h}, {m}]" for h in range(n) if h != m) + " == 1" for m in range(1, n)]
    lines += ["  - " + " + ".join(f"x[{h}, {m}]" for m in S for h in range(n) if h not in S) + " >= 1"
              for size in range(2, n) for S in itertools.combinations(range(1, n), size)]
    return (f"name: cut_arborescence\noutput: {{name: x, shape: [{n}, {n}]}}\nconstraints:\n"
            + "\n".join(lines) + "\nregularizers: [entropy, binary_entropy, quadratic]\n")


def _box_maximizer(s: np.ndarray, reg: str, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmax over lo <= x <= hi of sᵀx − f(x), per coordinate, and its derivative in s
    (1/f''(x) inside the box, 0 where clipped)."""
    with np.errstate(over="ignore"):
        if reg == "entropy":
            x = np.exp(np.minimum(s - 1.0, 700.0))
            dx = x
        elif reg == "binary_entropy":
            x = 0.5 * (1.0 + np.tanh(0.5 * s))
            dx = x * (1.0 - x)
        else:
            x, dx = s.copy(), np.ones_like(s)
    inside = (x > lo) & (x < hi)
    return np.clip(x, lo, hi), np.where(inside, dx, 0.0)


def dual_solve(theta: np.ndarray, form, reg: str) -> tuple[np.ndarray, float]:
    """argmax θᵀx − f(x) over ``form`` (a CanonicalForm without auxiliary variables, any
    equality and inequality rows ``C x (=, ≤) c`` and bounds) for a separable f, through its
    dual: ``min g(λ) = Σ_i φ_i((θ − Cᵀλ)_i) + λᵀc`` with λ ≥ 0 on the inequality rows and φ_i
    the conjugate of f on the box of x_i, in closed form, ``∇g = c − C x(λ)`` with x(λ) the
    box maximizer. L-BFGS-B, then Newton steps on the rows it found active, solved to rounding
    (the entropy at |θ| > 16: L-BFGS-B by continuation in the scale of θ, the Newton steps damped).
    Returns x and its certificate: the largest primal violation or complementarity product
    (|λ_j| · slack_j, relative to 1 + max|θ|), ~1e-15 where the solve succeeded."""
    if form.num_z != form.out_size:
        raise ValueError("dual_solve takes forms without auxiliary variables")
    from scipy.optimize import minimize

    C = np.vstack([form.A_eq.toarray(), form.A_ub.toarray()])
    c = np.concatenate([form.b_eq, form.b_ub])
    eq = np.arange(len(c)) < form.num_eq
    lo, hi = form.lb, form.ub

    def x_of(lam):
        return _box_maximizer(theta - C.T @ lam, reg, lo, hi)

    def g(lam):
        s = theta - C.T @ lam
        x, _ = _box_maximizer(s, reg, lo, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            if reg == "entropy":
                f = np.where(x > 0, x * np.log(x), 0.0)
            elif reg == "binary_entropy":
                f = np.where(x > 0, x * np.log(x), 0.0) + np.where(x < 1, (1 - x) * np.log(1 - x), 0.0)
            else:
                f = 0.5 * x * x
        return float(s @ x - f.sum() + lam @ c), c - C @ x

    def certify(lam):  # the largest primal violation or complementarity product
        slack = c - C @ x_of(lam)[0]
        viol = np.where(eq, np.abs(slack), np.maximum(-slack, 0.0))
        comp = np.where(eq, 0.0, np.abs(lam * slack)) / (1.0 + np.abs(theta).max())
        return float(max(viol.max(initial=0.0), comp.max(initial=0.0)))

    lam = np.zeros(len(c))
    if len(c):
        bounds = [(None, None) if e else (0.0, None) for e in eq]
        # the entropy at large |θ| (its conjugate e^(s − 1) at e^40 and beyond) by continuation:
        # L-BFGS-B at θ scaled to |θ| ≤ 16 first, then twice that, ..., each from the last
        # multipliers scaled along (the binary entropy's log(1 + e^s) grows linearly: not needed)
        top = float(np.abs(theta).max(initial=0.0))
        scale = 1.0 if reg != "entropy" or top <= 16.0 else 16.0 / top
        full = theta
        while True:
            theta = full * scale
            lam = minimize(g, lam, jac=True, method="L-BFGS-B", bounds=bounds,
                           options=dict(ftol=1e-16, gtol=1e-14, maxiter=10_000)).x
            if scale == 1.0:
                break
            lam, scale = lam * min(1.0, 2.0 * scale) / scale, min(1.0, 2.0 * scale)
        for _ in range(50):
            x, dx = x_of(lam)
            res = C @ x - c
            act = eq | (lam > 0) | (np.abs(res) < 1e-8)
            if not act.any():
                break
            J = C[act] @ (dx[:, None] * C[act].T)
            step = np.zeros_like(lam)
            step[act] = np.linalg.lstsq(J, res[act], rcond=1e-13)[0]
            new = np.where(eq, lam + step, np.maximum(lam + step, 0.0))  # lands on the active set exactly
            if reg == "entropy":  # damped: full steps from flows of e^-40 went astray (certificates of 2)
                g0, r0 = g(lam)[0], certify(lam)
                for alpha in 0.5 ** np.arange(40):  # the largest that lowers the certificate or the dual
                    new = np.where(eq, lam + alpha * step, np.maximum(lam + alpha * step, 0.0))
                    if certify(new) < r0 or g(new)[0] < g0 - 1e-4 * alpha * (res @ step):
                        break
                else:
                    break
            if np.array_equal(new, lam):
                break
            lam = new
    return x_of(lam)[0], certify(lam)


def random_constraint_config(rng: np.random.Generator, name: str) -> str:
    """A user config (YAML text) of a random polytope in [0, 1]^d without auxiliary variables:
    a few equality and inequality rows with small integer coefficients through a random interior
    point (a third of the inequalities tight there). Not integral in general: a relaxation is
    defined over any such P, a hard sample is not."""
    d = int(rng.integers(3, 8))
    x0 = rng.uniform(0.1, 0.9, d)
    rows = []
    for kind in ["=="] * int(rng.integers(0, 3)) + ["<="] * int(rng.integers(1, 5)):
        a = rng.integers(-2, 3, d) * (rng.random(d) < 0.6)
        if not a.any():
            continue
        rhs = a @ x0 + (0.0 if kind == "==" or rng.random() < 0.3 else rng.uniform(0.0, 0.5))
        rows.append(" + ".join(f"{int(v)} * x[{i}]" for i, v in enumerate(a) if v) + f" {kind} {rhs:.15g}")
    return (f"name: {name}\noutput: {{name: x, shape: [{d}]}}\nconstraints:\n  - 0 <= x <= 1\n"
            + "".join(f"  - {r}\n" for r in rows))


def masked_face_solve(theta: np.ndarray, form, low: np.ndarray, reg: str) -> tuple[np.ndarray, float]:
    """The relaxation when the entries ``low`` of θ are so far below the others (a manual mask at
    -1e9) that they act lexicographically, for a form without auxiliary variables: the face of
    P with the least mass m* on them, ``Σ_low x = m*`` (an LP, scipy's HiGHS), the coordinates
    constant on that face fixed (LPs), then :func:`dual_solve` there with the low entries at
    their differences from the highest of them (all 0 for one mask value). Returns ``(x, certificate)``."""
    import dataclasses

    import scipy.sparse as sp
    from scipy.optimize import linprog

    eq = dict(A_eq=form.A_eq.toarray(), b_eq=form.b_eq) if form.num_eq else {}
    ub = dict(A_ub=form.A_ub.toarray(), b_ub=form.b_ub) if form.num_ub else {}
    w = low.astype(float)
    m_star = linprog(w, **eq, **ub, bounds=list(zip(form.lb, form.ub)), method="highs").fun
    face = dataclasses.replace(form, A_eq=sp.vstack([form.A_eq, sp.csr_matrix(w[None, :])]).tocsr(),
                               b_eq=np.append(form.b_eq, m_star))
    lb, hi = face.lb.copy(), face.ub.copy()
    feq = dict(A_eq=face.A_eq.toarray(), b_eq=face.b_eq)
    for j in range(form.num_z):
        e = np.eye(form.num_z)[j]
        top = -linprog(-e, **feq, **ub, bounds=list(zip(form.lb, form.ub)), method="highs").fun
        bottom = linprog(e, **feq, **ub, bounds=list(zip(form.lb, form.ub)), method="highs").fun
        if top - bottom < 1e-9:
            lb[j] = hi[j] = round(top, 9)
    face = dataclasses.replace(face, lb=lb, ub=hi)
    th = theta.copy()
    if low.any():
        th[low] = theta[low] - theta[low].max()
    return dual_solve(th, face, reg)


def correlated_subsets(n: int, k: int) -> np.ndarray:
    """The correlated k-subsets ``(C(n, k), 2n − 1)``, enumerated: the items, then the adjacent
    pairs chosen together (independent of the library's dynamic program)."""
    rows = []
    for chosen in itertools.combinations(range(n), k):
        items = [int(i in chosen) for i in range(n)]
        rows.append(items + [items[i] * items[i + 1] for i in range(n - 1)])
    return np.array(rows)


def _mp_solve(K: list, r: list) -> list:
    """``K⁻¹ r`` by Gaussian elimination with partial pivoting, on lists of mpmath numbers."""
    import mpmath as mp

    n = len(r)
    A = [row[:] + [r[i]] for i, row in enumerate(K)]
    for c in range(n):
        p = max(range(c, n), key=lambda i: abs(A[i][c]))
        A[c], A[p] = A[p], A[c]
        for i in range(c + 1, n):
            f = A[i][c] / A[c][c]
            if f:
                for j in range(c + 1, n + 1):
                    A[i][j] -= f * A[c][j]
    x: list = [0] * n
    for i in range(n - 1, -1, -1):
        x[i] = (A[i][n] - mp.fsum(A[i][j] * x[j] for j in range(i + 1, n))) / A[i][i]
    return x


def hull_relax_jvp_mp(V: np.ndarray, theta: np.ndarray, d: np.ndarray, reg: str = "entropy", dps: int = 60
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``x = argmax_{x ∈ conv(V)} θᵀx − f(x)`` and its derivative ``(dx/dθ) d``, for the entropy
    ``f = Σ x log x``, the binary entropy ``Σ x log x + (1 − x) log(1 − x)`` or the quadratic
    ``½‖x‖²`` (the projection onto conv(V)), in
    ``dps``-digit arithmetic (mpmath): independent of our constraints, solvers and float64.

    A barrier method on the vertex weights λ (``x = Vᵀλ``, ``Σ λ = 1``, ``μ Σ log λ``, μ from 1
    down by 100x a level), and the derivative of the barrier problem at each level from 1e-12
    on (``dλ`` from its Newton system, ``dx = Vᵀ dλ``), until two levels agree to 1e-12 in dx
    and 1e-20 in x. λ is not unique where V has more vertices than the hull has dimensions, but
    x and dx are (the barrier picks the analytic centre). At a point where the face of x does
    not change, the barrier's derivative tends to the exact one as μ falls below the weights
    that matter. Near a vertex with tied utilities these can be far below any float64 scale (a
    correlated k-subset row at t = 0.1: dx moved by 0.17 between μ = 1e-26 and 1e-28, settled
    by 1e-40), and a weight that matters but moves dx by less than 1e-12 at the first levels
    would end the loop early. A ``RuntimeError`` if μ reaches ``10^(4 − dps)`` first. Useful
    near a vertex (weights of 1e-8, within 1e-9 of a kink in θ), where central differences of a
    float64 forward need steps below the solver's accuracy. Small V only (dense, O(|V|³) per
    step; 35 vertices take about 4 s)."""
    import mpmath as mp

    with mp.workdps(dps):
        m, D = V.shape
        binary, quadratic = reg == "binary_entropy", reg == "quadratic"
        if not quadratic and ((~V.any(0)).any() or (binary and V.all(0).any())):  # x on a domain end
            raise ValueError("leave out the coordinates that are 0 on every vertex (and, for the binary entropy, 1)")
        th = [mp.mpf(float(a)) for a in theta]
        dd = [mp.mpf(float(a)) for a in d]
        supp = [[i for i in range(D) if V[a, i]] for a in range(m)]
        common = [[[i for i in range(D) if V[a, i] and V[b, i]] for b in range(m)] for a in range(m)]

        def system(lam: list, mu) -> tuple[list, list]:
            x = [mp.fsum(lam[j] for j in range(m) if V[j, i]) for i in range(D)]
            r = [mp.mpf(1) if quadratic else 1 / xi + (1 / (1 - xi) if binary else 0) for xi in x]
            K = [[mp.mpf(0)] * (m + 1) for _ in range(m + 1)]
            for a in range(m):
                for b in range(a, m):
                    K[a][b] = K[b][a] = -mp.fsum(r[i] for i in common[a][b])
                K[a][a] -= mu / lam[a] ** 2
                K[a][m] = K[m][a] = mp.mpf(1)
            return x, K

        lam = [mp.mpf(1) / m] * m
        mu, floor = mp.mpf(1), mp.mpf(10) ** (4 - dps)
        last = None
        while mu > floor:
            for _ in range(8):
                x, K = system(lam, mu)
                gx = [th[i] - (x[i] if quadratic else mp.log(x[i]) - mp.log(1 - x[i]) if binary else mp.log(x[i]) + 1)
                      for i in range(D)]
                g = [mp.fsum(gx[i] for i in supp[j]) + mu / lam[j] for j in range(m)]
                step = _mp_solve(K, [-a for a in g] + [mp.mpf(0)])
                a = min([mp.mpf(1)] + [mp.mpf("0.9") * lam[j] / -step[j] for j in range(m) if step[j] < 0])
                lam = [lam[j] + a * step[j] for j in range(m)]
                if a == 1 and max(abs(step[j]) / lam[j] for j in range(m)) < mp.mpf(10) ** (-dps // 2):
                    break
            if mu <= mp.mpf("1e-12"):  # the derivative of the barrier problem λ is centred for
                x, K = system(lam, mu)
                dlam = _mp_solve(K, [-mp.fsum(dd[i] for i in supp[j]) for j in range(m)] + [mp.mpf(0)])
                dx = [mp.fsum(dlam[j] for j in range(m) if V[j, i]) for i in range(D)]
                if last is not None:
                    size = 1 + max(abs(v) for v in dx)
                    if (max(abs(a - b) for a, b in zip(dx, last[1])) <= mp.mpf("1e-12") * size
                            and max(abs(a - b) for a, b in zip(x, last[0])) <= mp.mpf("1e-20")):
                        return np.array([float(v) for v in x]), np.array([float(v) for v in dx])
                last = (x, dx)
            mu /= 100
        raise RuntimeError(f"the barrier's derivative did not settle by μ = {mp.nstr(floor, 3)}; raise dps")
