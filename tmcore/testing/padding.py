"""Checks that a matching function treats a padded batch exactly as its samples one by one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tmcore.plan import Plan, merge_tokens

__all__ = ["assert_padded_equals_unpadded", "right_padding"]


def right_padding(lengths: list[int], n: int, device: torch.device | None = None) -> Tensor:
    """``[B, n]`` bool padding mask with the first ``lengths[i]`` tokens of sample ``i`` real."""
    return torch.arange(n, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)


def assert_padded_equals_unpadded(
    match: Callable[[Tensor, Tensor | None], Plan], x: Tensor, valid: Tensor, size: Tensor | None = None
) -> None:
    """Assert that ``match(x, valid)`` on a padded batch gives every sample what
    ``match(x_i, None)`` gives it alone: the same tokens, sizes and order first, then only
    padding, and that no padding token joins a real token's group.

    Args:
        match: builds a Plan from ``[B, N, C]`` tokens and a padding mask (``None``: no padding).
        x: ``[B, N, C]`` tokens (the features the plan is applied to; pass the metric itself).
        valid: ``[B, N]`` bool, real tokens first.
        size: ``[B, N, 1]`` token sizes, or ``None``.
    """
    plan = match(x, valid)
    assert plan.valid is not None, "a padded batch must give a plan with validity"
    merged, merged_size = merge_tokens(x, plan, size)
    dest = _destinations(plan)
    for i, n_i in enumerate(valid.sum(1).tolist()):
        alone = match(x[i : i + 1, :n_i], None)
        ref, ref_size = merge_tokens(x[i : i + 1, :n_i], alone, None if size is None else size[i : i + 1, :n_i])
        m_i = ref.shape[1]
        assert int(plan.valid[i].sum()) == m_i, f"sample {i}: {int(plan.valid[i].sum())} tokens, alone {m_i}"
        assert plan.valid[i, :m_i].all(), f"sample {i}: padding before real tokens"
        torch.testing.assert_close(merged[i, :m_i], ref[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged_size[i, :m_i], ref_size[0], rtol=0, atol=0)
        pad_dest = dest[i, n_i:]
        assert not (pad_dest[pad_dest >= 0] < m_i).any(), f"sample {i}: a padding token joined a real token"


def _destinations(plan: Plan) -> Tensor:
    from tmcore.plan import destinations

    return destinations(plan)
