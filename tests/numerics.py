"""The one comparison every numerics test uses: each tensor against its own scale.

    assert_same(split_grad, reference_grad, name="layers.0.weight")

``torch.testing.assert_close(a, b, atol=1e-5)`` passes a gradient whose entries are all ~1e-6
even when every one of them is 10% off: the absolute tolerance swallows it. Here the error is
measured as max|got − want| ÷ max|want|, so a tensor is compared relative to its own size
whatever that size is, and the tolerance follows the dtype (a bf16 tensor carries ~3 digits).
A test in ``test_numerics.py`` proves a 1% error in every entry is rejected.
"""

from __future__ import annotations

import torch

RTOL_BY_DTYPE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
"""Largest accepted max|got − want| ÷ max|want| per dtype: float32 allows for a different
summation order (microbatches, another device), far below the 1% a wrong result shows."""


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got − want| ÷ max|want| (the absolute error where ``want`` is all zeros)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    error = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return error / scale if scale > 0 else error


def assert_same(got, want, *, rtol: float | None = None, name: str = "") -> None:
    """Fail unless ``got`` equals ``want`` in shape, dtype and values within ``rtol`` of
    max|want| (default: by dtype, ``RTOL_BY_DTYPE``). Non-tensors must be equal; None must
    match None (a gradient that is missing on one side fails)."""
    where = f" ({name})" if name else ""
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        assert got is None and want is None or got == want, f"{got!r} != {want!r}{where}"
        return
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}{where}"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}{where}"
    if not want.is_floating_point() and not want.is_complex():
        assert torch.equal(got.cpu(), want.cpu()), f"integer tensors differ{where}"
        return
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"non-finite values differ{where}"
    tolerance = rtol if rtol is not None else RTOL_BY_DTYPE.get(want.dtype, 2e-5)
    error = relative_error(got, want)
    assert error <= tolerance, (f"max|got − want| ÷ max|want| = {error:.3g} > {tolerance:.3g}{where}; "
                                f"max|want| = {want.detach().abs().max().item():.3g}")
