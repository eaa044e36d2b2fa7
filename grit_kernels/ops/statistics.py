"""``accumulate_rank_statistics_``: GRIT's per-module statistics of one backward, straight into the bank.

For each of ``K`` modules with rank-space activations ``h`` and gradients ``delta`` (``[N, r]``), rows whose
``|delta_t|^2 > tolerance^2 * max_t |delta_t|^2`` "carry gradient" (padding and positions no loss reaches do
not), and::

    stat_sum[0, m] += sum_{t carrying} h_t h_t^T     stat_sum[1, m] += sum_t delta_t delta_t^T
    rows[m]        += number of carrying rows

:func:`accumulate_rank_statistics_` adds one recorded group (one module on PEFT's path, a projection group in
fused blocks); :func:`accumulate_rank_statistics_many_` adds every group recorded in one backward in one call
(what :data:`grit_kernels.layers.RECORDER` does on the CPU): the ``cpp`` kernel does masks, Grams and bank
updates of all of them in one C++ op, parallel over modules (the torch form is ~15 small ops per group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import kernel, resolve_backend


def rank_statistics(h: torch.Tensor, delta: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grams and row counts of ``K`` modules at once (torch ops; traceable by ``torch.compile``).

    Args:
        h, delta: ``[N, K, r]`` rank-space activations and their gradients (any float dtype).
        tolerance: rows with ``|delta_t| <= tolerance * max_t |delta_t|`` carry no gradient.
    Returns:
        ``grams [2, K, r, r]`` fp32 (fp64 for fp64 inputs; ``[0] = sum h h^T`` over rows that carry gradient,
        ``[1] = sum delta delta^T``) and ``rows [K]`` fp32.
    """
    if h.dtype not in (torch.float32, torch.float64) or delta.dtype != h.dtype:
        h, delta = h.float(), delta.float()
    row_sq = (delta * delta).sum(dim=2)  # [N, K] (a sum over the small last dim: fast, unlike amax)
    carries = row_sq > row_sq.amax(dim=0, keepdim=True).mul_(tolerance**2)
    masked = h * carries.unsqueeze(2)
    # [K, r, N] @ [K, N, r] on strided views: BLAS-compatible, no transposed copies
    forward_gram = torch.bmm(masked.permute(1, 2, 0), h.permute(1, 0, 2))
    backward_gram = torch.bmm(delta.permute(1, 2, 0), delta.permute(1, 0, 2))
    return torch.stack([forward_gram, backward_gram]), carries.sum(dim=0, dtype=torch.float32)


def add_rank_statistics_(
    stat_sum: torch.Tensor, rows: torch.Tensor, indices: Sequence[int], grams: torch.Tensor, counts: torch.Tensor
) -> None:
    """``stat_sum[:, indices[k], :r, :r] += grams[:, k]``, ``rows[indices[k]] += counts[k]`` with in-place ops on
    views only (traceable): one slice for a contiguous ascending run, else one per module."""
    r, first = grams.shape[-1], indices[0]
    if tuple(indices) == tuple(range(first, first + len(indices))):
        stat_sum[:, first : first + len(indices), :r, :r].add_(grams.to(stat_sum.dtype))
        rows[first : first + len(indices)].add_(counts.to(rows.dtype))
        return
    for j, i in enumerate(indices):
        stat_sum[:, i, :r, :r].add_(grams[:, j].to(stat_sum.dtype))
        rows[i : i + 1].add_(counts[j : j + 1].to(rows.dtype))


def accumulate_rank_statistics_(
    stat_sum: torch.Tensor,
    rows: torch.Tensor,
    indices: Sequence[int],
    h: torch.Tensor,
    delta: torch.Tensor,
    tolerance: float,
    backend: str = "auto",
) -> None:
    """Add the statistics of modules ``indices`` (all of rank ``r``) to a bank, in place.

    Args:
        stat_sum: ``[2, M, R, R]`` float32 (float64 in tests) step sums of the bank, ``R >= r``.
        rows: ``[M]`` row counts, same dtype.
        indices: ``K`` distinct bank indices (host integers).
        h, delta: ``[..., K * r]`` (rows: the leading dims flattened; modules side by side), float32/float16/bfloat16.
        tolerance: relative row-norm threshold of "carries gradient" (``grit_kernels.layers.ZERO_ROW_TOLERANCE``).
    No host synchronisation. Oracle: :func:`grit_kernels.reference.rank_statistics`.
    """
    _check_group(stat_sum, indices, h, delta, "accumulate_rank_statistics_")
    kernel(resolve_backend(backend, h.device), "accumulate_rank_statistics_")(
        stat_sum, rows, indices, h, delta, tolerance
    )


def _check_group(stat_sum: torch.Tensor, indices: Sequence[int], h: torch.Tensor, delta: torch.Tensor, op: str) -> None:
    k = len(indices)
    if k == 0 or h.dim() < 1 or h.shape != delta.shape or h.shape[-1] % k:
        raise ValueError(
            f"{op}: h and delta must be [..., K * r] with K = {k} modules, got {tuple(h.shape)} and {tuple(delta.shape)}"
        )
    if stat_sum.dim() != 4 or stat_sum.shape[0] != 2 or h.shape[-1] // k > stat_sum.shape[-1]:
        raise ValueError(f"{op}: stat_sum must be [2, M, R, R] with R >= r, got {tuple(stat_sum.shape)}")


def accumulate_rank_statistics_many_(
    stat_sum: torch.Tensor,
    rows: torch.Tensor,
    groups: Sequence[tuple[Sequence[int], torch.Tensor, torch.Tensor]],
    tolerance: float,
    backend: str = "auto",
) -> None:
    """:func:`accumulate_rank_statistics_` of many groups at once: for each ``(indices, h, delta)`` of ``groups``
    (in order; ``h, delta [..., len(indices) * r]``, ranks and row counts may differ between groups, one dtype),
    the same additions as ``accumulate_rank_statistics_(stat_sum, rows, indices, h, delta, tolerance)``, with
    the same result bit for bit (each module's Grams are formed on their own; a module listed twice is added twice).

    One C++ op over all groups with the ``cpp`` backend (parallel over modules); one call per group otherwise.
    No host synchronisation. Oracle: :func:`grit_kernels.reference.rank_statistics`, group by group.
    """
    if not groups:
        return
    for indices, h, delta in groups:
        _check_group(stat_sum, indices, h, delta, "accumulate_rank_statistics_many_")
    kernel(resolve_backend(backend, groups[0][1].device), "accumulate_rank_statistics_many_")(
        stat_sum, rows, groups, tolerance
    )


def torch_accumulate_rank_statistics_many_(stat_sum, rows, groups, tolerance) -> None:
    """Torch backend of :func:`accumulate_rank_statistics_many_`: one :func:`torch_accumulate_rank_statistics_` per group."""
    for indices, h, delta in groups:
        torch_accumulate_rank_statistics_(stat_sum, rows, indices, h, delta, tolerance)


def torch_accumulate_rank_statistics_(stat_sum, rows, indices, h, delta, tolerance) -> None:
    """Torch backend of :func:`accumulate_rank_statistics_`: :func:`rank_statistics` + :func:`add_rank_statistics_`."""
    k = len(indices)
    r = h.shape[-1] // k
    h, delta = h.reshape(-1, k, r), delta.reshape(-1, k, r)
    if h.shape[0] == 0:
        return
    grams, counts = rank_statistics(h, delta, tolerance)
    add_rank_statistics_(stat_sum, rows, indices, grams, counts)
