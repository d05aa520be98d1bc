"""The shared comparison rejects what a loose absolute tolerance lets through."""

import pytest
import torch

from numerics import assert_same, relative_error


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1.0, 1e4])
def test_a_one_percent_error_in_every_entry_is_rejected_at_any_scale(scale):
    torch.manual_seed(0)
    want = torch.randn(64, 32) * scale
    assert_same(want.clone(), want)
    with pytest.raises(AssertionError, match="max\\|got − want\\| ÷ max\\|want\\|"):
        assert_same(want * 1.01, want, name="grad")
    # the absolute tolerance these comparisons replace passes the small ones
    if scale <= 1e-7:
        torch.testing.assert_close(want * 1.01, want, rtol=1e-5, atol=1e-5)


def test_a_one_percent_error_in_one_entry_and_a_zero_gradient_are_rejected():
    want = torch.randn(10, 10)
    wrong = want.clone()
    wrong.view(-1)[want.abs().argmax()] *= 1.01
    assert relative_error(wrong, want) == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(AssertionError):
        assert_same(wrong, want)
    with pytest.raises(AssertionError):
        assert_same(torch.zeros_like(want), want)  # an all-zero gradient is 100% off
    with pytest.raises(AssertionError):
        assert_same(None, want)  # a missing gradient


def test_dtype_shape_and_integers_must_match_and_bf16_gets_its_own_tolerance():
    want = torch.randn(8)
    with pytest.raises(AssertionError, match="dtype"):
        assert_same(want.double(), want)
    with pytest.raises(AssertionError, match="shape"):
        assert_same(want[:4], want)
    with pytest.raises(AssertionError, match="integer"):
        assert_same(torch.tensor([1, 2]), torch.tensor([1, 3]))
    half = want.bfloat16()
    assert_same(half, half)
    with pytest.raises(AssertionError):
        assert_same(half * 1.05, half)
