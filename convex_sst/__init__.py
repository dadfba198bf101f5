"""convex_sst: gradient estimation for discrete structures with stochastic softmax tricks.

A structure is declared as a polytope ``P = conv(𝒳)`` (a config file) and paired with a
strongly convex regularizer ``f``; :func:`relax` computes ``X_t = argmax_{x in P} uᵀx − t f(x)``
and :class:`SST` perturbs ``θ`` with noise first (Paulus et al., NeurIPS 2020,
https://arxiv.org/abs/2006.08063).
"""

from ._version import __version__
from .errors import (
    ConfigError,
    ConvexSSTError,
    InputError,
    NotSupportedError,
    PolytopeError,
    RegistrationError,
    SolverError,
    SolverWarning,
    UnknownNameError,
)
from .noise import Gaussian, Gumbel, Logistic, Noise
from .polytope import (
    Polytope,
    available_argmax,
    available_polytopes,
    load_polytope,
    register_argmax,
    register_polytope,
)
from .regularizers import Regularizer, available_regularizers, register_regularizer
from .relax import available_fast_paths, register_fast_path, relax
from .sst import SST, sst
from .estimators import (
    EMABaseline,
    exact_gradient,
    expected_loss,
    gumbel_kl,
    score_function,
    smt_distribution,
    sst_gradient,
)
from .diagnostics import diagnose
from .partition import log_partition
from . import argmax as _argmax  # noqa: E402,F401  (registers the combinatorial argmax algorithms)
from . import fast as _fast  # noqa: E402,F401  (registers the fast paths)
from . import testing  # noqa: E402

__all__ = [
    "__version__",
    "ConfigError", "ConvexSSTError", "InputError", "NotSupportedError", "PolytopeError", "RegistrationError",
    "SolverError", "SolverWarning", "UnknownNameError",
    "Gaussian", "Gumbel", "Logistic", "Noise",
    "Polytope", "available_argmax", "available_polytopes", "load_polytope", "register_argmax",
    "register_polytope",
    "Regularizer", "available_regularizers", "register_regularizer",
    "available_fast_paths", "register_fast_path", "relax",
    "SST", "sst", "testing",
    "EMABaseline", "exact_gradient", "expected_loss", "gumbel_kl", "score_function", "smt_distribution",
    "sst_gradient", "diagnose", "log_partition",
]
