"""Batched LU solves and inverses that stay correct under ``torch.set_num_threads(k > 1)``.

On the CPU, torch's batched LU factorization calls MKL's ``getrf`` from several threads at once
for matrices larger than about 14 × 14 (pytorch/pytorch#142815, #141358; proposed fix
pytorch/pytorch#181570, not in torch 2.13). Once MKL threads a factorization itself (order ≥ 150
with torch 2.13's MKL 2024.2), after an explicit ``torch.set_num_threads`` with 2 to 16 threads,
``torch.linalg.solve`` and ``torch.linalg.inv_ex`` of a ``(B ≥ 2, n, n)`` batch returned wrong
numbers without an error (residuals ~1e17), raised ``RuntimeError: Pivots given to lu_solve
must all be greater or equal to 1``, or hung. A single matrix is factored correctly, so from
``_LOOP_MIN`` on, CPU batches are factored one matrix at a time (each threaded by MKL; about
1.5× the time of the batched call at n = 100, B = 64, a smaller share above). CUDA and single
matrices take the batched call. Cholesky factorizations are not affected (checked to n = 512).
"""

from __future__ import annotations

import torch

_LOOP_MIN = 96  # below the observed threshold (150) with a margin for other MKL builds


def _per_matrix(A: torch.Tensor) -> bool:
    return (A.device.type == "cpu" and A.dim() == 3 and A.shape[0] > 1 and A.shape[-1] >= _LOOP_MIN
            and torch.get_num_threads() > 1)


def solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(A, b)`` for ``A: (B, n, n)``, ``b: (B, n, k)``."""
    if not _per_matrix(A):
        return torch.linalg.solve(A, b)
    return torch.stack([torch.linalg.solve(Ai, bi) for Ai, bi in zip(A, b)])


def inv_ex(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.inv_ex(A)`` for ``A: (B, n, n)``: ``(inverse, info)``."""
    if not _per_matrix(A):
        return torch.linalg.inv_ex(A)
    parts = [torch.linalg.inv_ex(Ai) for Ai in A]
    return torch.stack([K for K, _ in parts]), torch.stack([info for _, info in parts])
