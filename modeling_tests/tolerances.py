"""Tolerances for comparing two computation paths, derived from the dtype and the operation.

Two paths that compute the same value with different kernels (other block sizes or vector widths: AVX2 and AVX-512
round differently; fused and unfused operations; another batch layout) agree only to the rounding their operations
accumulate. Each rounding of a value of magnitude `scale` in a dtype with machine epsilon `eps` is off by at most
`eps * scale / 2`, and a chain of `steps` such roundings by at most about `steps * eps * scale`. The helpers here state
a tolerance as that: a dtype, a number of rounding steps named after the operation, and the scale of the values.
"""

import torch


# A forward pass of the tiny test models: widths of at most 64, vocabularies and sequences of a few hundred, a handful
# of layers. Each reduction is off by about sqrt(terms) roundings and each layer carries its input's error on, so 256
# roundings of the output's magnitude bound what two kernel paths of one such pass can differ by.
TINY_FORWARD_STEPS = 256


def rounding_tolerance(dtype: torch.dtype, steps: float, scale: float | torch.Tensor) -> dict[str, float]:
    """`torch.testing.assert_close` keyword arguments for two paths that differ by up to `steps` roundings of `dtype`
    at the magnitude `scale` (a number, or the tensor whose largest magnitude sets it)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().abs().max().item()
    eps = torch.finfo(dtype).eps
    return {"atol": steps * eps * float(scale), "rtol": steps * eps}


def rounding_bound(dtype: torch.dtype, steps: float, scale: float | torch.Tensor) -> float:
    """The absolute bound of `rounding_tolerance`, for a value that should be zero up to rounding."""
    return rounding_tolerance(dtype, steps, scale)["atol"]


def float32_forward(reference: torch.Tensor) -> dict[str, float]:
    """`assert_close` keyword arguments for two float32 forward passes of a tiny model that take other kernel paths
    (batch layout, attention back-end, compiled or eager, merged or separate adapters, ...) at `reference`'s scale."""
    return rounding_tolerance(torch.float32, TINY_FORWARD_STEPS, reference)
