"""Masked reductions shared by every loss.

``mask`` is binary (bool, or float 1.0/0.0) and broadcastable to ``x``: 1 marks an element that
counts. Masked-out elements are replaced by 0 with ``torch.where`` before reducing, so padding
that holds ``inf`` or ``nan`` (e.g. log-probs of pad tokens) cannot leak into a result or a
gradient. An empty mask gives 0, not ``nan`` (the count is clamped to at least 1).
"""

import torch


def _keep(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is set, 0 elsewhere (broadcast to a common shape)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _count(x: torch.Tensor, mask: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Number of counted elements, in ``x``'s dtype (after broadcasting ``mask`` to ``x``)."""
    m = torch.broadcast_to(mask.bool(), torch.broadcast_shapes(x.shape, mask.shape)).to(x.dtype)
    return m.sum() if dim is None else m.sum(dim, keepdim=keepdim)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Sum of the counted elements of ``x``: over everything (``dim=None``, a scalar) or along ``dim``."""
    kept = _keep(x, mask)
    return kept.sum() if dim is None else kept.sum(dim, keepdim=keepdim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Mean of the counted elements of ``x``; 0 where nothing is counted.

    ``dim=None`` averages over every counted element of the batch (one token, one vote), which is
    what token-level losses use; ``dim=1`` on ``[B, T]`` gives a per-row mean ``[B]``.
    """
    count = _count(x, mask, dim, keepdim).clamp(min=1)
    return masked_sum(x, mask, dim, keepdim) / count


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, dim=None, keepdim: bool = False
) -> torch.Tensor:
    """Variance of the counted elements of ``x``.

    ``unbiased=True`` applies Bessel's correction n/(n-1); with n <= 1 counted elements no
    correction is possible and the (zero) biased variance is returned.
    """
    x = _keep(x, mask)  # so that padding's inf/nan cannot reach the gradient through (x - mean)
    mean = masked_mean(x, mask, dim, keepdim=True)  # a scalar when dim is None
    var = masked_mean((x - mean) ** 2, mask, dim, keepdim)
    if unbiased:
        n = _count(x, mask, dim, keepdim)
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` by the mean and (unbiased) std of its counted elements, over the whole tensor.

    Returns ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back
    (scale only). Elements outside ``mask`` are 0 in the result.
    """
    x = _keep(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _keep(whitened, mask)
