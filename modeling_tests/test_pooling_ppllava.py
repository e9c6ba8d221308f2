"""Prompt-guided pooling: the fast strided formulation computes exactly the windowed weighted average."""

import itertools
import math

import pytest
import torch
from tolerances import rounding_bound

from ppllava_hf.models.ppllava import modeling_ppllava
from ppllava_hf.models.ppllava.modeling_ppllava import prompt_guided_pool
from ppllava_hf.models.ppllava.token_counts_ppllava import plan_pooling


TEMPERATURE = 0.01


def loop_reference(features: torch.Tensor, relevance: torch.Tensor, plan, temperature: float) -> torch.Tensor:
    """The definition, one window at a time in float64: softmax(relevance / T) over the window, then the weighted sum."""
    features, relevance = features.double(), relevance.double()
    batch, dim = features.shape[0], features.shape[-1]
    output = torch.empty((batch, *plan.output_size, dim), dtype=torch.float64)
    for position in itertools.product(*(range(n) for n in plan.output_size)):
        window = tuple(slice(p * s, p * s + k) for p, s, k in zip(position, plan.stride, plan.kernel))
        patches = features[(slice(None), *window)].reshape(batch, -1, dim)
        weights = torch.softmax(relevance[(slice(None), *window)].reshape(batch, -1) / temperature, dim=-1)
        output[(slice(None), *position)] = (weights[..., None] * patches).sum(dim=1)
    return output


def random_inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    # Relevance on the scale of a softmax over few patches, so the temperature makes the window weights far from uniform.
    relevance = torch.rand(shape[:-1], generator=generator).mul(0.05)
    return features, relevance


# (batch, frames, rows, columns, dim), kernel, stride
CASES = {
    "default_windows": ((1, 8, 6, 6, 16), (2, 3, 3), (2, 3, 3)),
    "odd_sizes_drop_trailing": ((2, 7, 10, 11, 5), (2, 3, 3), (2, 3, 3)),
    "overlapping_windows": ((1, 9, 8, 7, 8), (3, 3, 2), (2, 2, 1)),
    "budget_style_temporal_overlap": ((1, 47, 3, 3, 4), (5, 3, 3), (3, 3, 3)),
    "stride_one_everywhere": ((1, 4, 5, 5, 3), (2, 2, 2), (1, 1, 1)),
    "identity_windows": ((3, 5, 6, 7, 5), (1, 1, 1), (1, 1, 1)),
    "one_window_over_everything": ((2, 3, 4, 5, 6), (3, 4, 5), (1, 1, 1)),
}

# Relative error allowed against the float64 definition: float32 arithmetic, or one rounding of the output.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-10}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_fast_pooling_equals_the_window_loop(case, dtype):
    shape, kernel, stride = CASES[case]
    plan = plan_pooling(shape[1:4], kernel=kernel, stride=stride)
    features, relevance = random_inputs(shape, dtype)

    pooled = prompt_guided_pool(features, relevance, plan, TEMPERATURE)

    assert pooled.dtype == dtype
    assert pooled.shape == (shape[0], *plan.output_size, shape[-1])
    assert relative_error(pooled, loop_reference(features, relevance, plan, TEMPERATURE)) <= TOLERANCE[dtype]


def test_fp32_matches_the_unfold_formulation_of_the_original():
    """The original unfolds features and relevance, softmaxes each window, and sums: same numbers within 1e-6."""
    features, relevance = random_inputs((2, 9, 12, 12, 32), torch.float32, seed=3)
    plan = plan_pooling((9, 12, 12), kernel=(2, 3, 3), stride=(2, 3, 3))
    unfolded = features.permute(0, 4, 1, 2, 3)
    for axis, (k, s) in enumerate(zip(plan.kernel, plan.stride)):
        unfolded = unfolded.unfold(2 + axis, k, s)
        relevance_windows = (relevance if axis == 0 else relevance_windows).unfold(1 + axis, k, s)
    unfolded = unfolded.reshape(2, 32, *plan.output_size, -1)
    weights = torch.softmax(relevance_windows.reshape(2, *plan.output_size, -1) / TEMPERATURE, dim=-1)
    expected = (unfolded * weights[:, None]).sum(-1).permute(0, 2, 3, 4, 1)

    pooled = prompt_guided_pool(features, relevance, plan, TEMPERATURE)

    assert float((pooled - expected).norm() / expected.norm()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_blocks_do_not_change_the_result(monkeypatch, dtype):
    """On CPU the output is accumulated in blocks of output frames; one frame per block gives the same numbers, up to
    rounding: each window offset adds one product (fused in vector loops, a multiply and an add in scalar tails, whose
    positions move with the block size), so up to one float32 rounding per offset, then one to the output dtype."""
    features, relevance = random_inputs((1, 9, 8, 7, 8), dtype, seed=1)
    plan = plan_pooling((9, 8, 7), kernel=(3, 3, 2), stride=(2, 2, 1))
    whole = prompt_guided_pool(features, relevance, plan, TEMPERATURE)

    monkeypatch.setattr(modeling_ppllava, "_CPU_BLOCK_ELEMENTS", 1)
    blocked = prompt_guided_pool(features, relevance, plan, TEMPERATURE)

    tolerance = rounding_bound(torch.float32, math.prod(plan.kernel), whole) + rounding_bound(dtype, 1, whole)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=tolerance)


@pytest.mark.parametrize("block", [1, 2, 3, 100])
def test_temporal_blocks_reassemble_the_plan(block):
    """Pooling each temporal block on the frames it reads, then concatenating, gives the whole-plan output."""
    features, relevance = random_inputs((1, 11, 6, 6, 4), torch.float64, seed=2)
    plan = plan_pooling((11, 6, 6), kernel=(3, 3, 3), stride=(2, 3, 3))

    pieces = [
        prompt_guided_pool(features[:, frames], relevance[:, frames], block_plan, TEMPERATURE)
        for _, frames, block_plan in plan.temporal_blocks(block)
    ]

    torch.testing.assert_close(torch.cat(pieces, dim=1), prompt_guided_pool(features, relevance, plan, TEMPERATURE))
    assert [output_frames for output_frames, _, _ in plan.temporal_blocks(block)][-1].stop == plan.output_size[0]


def test_gradients_match_the_window_loop():
    features, relevance = random_inputs((1, 5, 4, 4, 3), torch.float32, seed=4)
    plan = plan_pooling((5, 4, 4), kernel=(3, 2, 2), stride=(2, 1, 2))
    cotangent = torch.randn((1, *plan.output_size, 3), dtype=torch.float64)

    def gradients(pool, dtype):
        inputs = tuple(tensor.detach().to(dtype).requires_grad_(True) for tensor in (features, relevance))
        (pool(*inputs, plan, TEMPERATURE).double() * cotangent).sum().backward()
        return [tensor.grad.double() for tensor in inputs]

    for actual, expected in zip(gradients(prompt_guided_pool, torch.float32), gradients(loop_reference, torch.float64)):
        assert relative_error(actual, expected) <= 1e-5


def test_uniform_relevance_is_plain_average_pooling():
    features = torch.randn(2, 6, 9, 9, 5)
    plan = plan_pooling((6, 9, 9), kernel=(2, 3, 3), stride=(2, 3, 3))

    pooled = prompt_guided_pool(features, torch.full((2, 6, 9, 9), 0.3), plan, TEMPERATURE)

    expected = torch.nn.functional.avg_pool3d(features.permute(0, 4, 1, 2, 3), plan.kernel, plan.stride)
    torch.testing.assert_close(pooled, expected.permute(0, 2, 3, 4, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_path_gives_the_inference_numbers(dtype):
    """With autograd recording, the op takes its differentiable formulation: same values as under no_grad."""
    features, relevance = random_inputs((1, 9, 8, 7, 8), dtype, seed=5)
    plan = plan_pooling((9, 8, 7), kernel=(3, 3, 2), stride=(2, 2, 1))
    with torch.no_grad():
        inference = prompt_guided_pool(features, relevance, plan, TEMPERATURE)

    training = prompt_guided_pool(features.requires_grad_(True), relevance, plan, TEMPERATURE)

    assert training.requires_grad and training.dtype == dtype
    torch.testing.assert_close(training.detach(), inference)
