"""Prompt-guided pooling: 3-D windows over (frames, rows, columns) averaged with weights from the prompt relevance.

Also holds the window arithmetic (`PoolingPlan`), which the processor shares to expand each placeholder to exactly the
number of tokens the model produces.
"""

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn


Triple = tuple[int, int, int]


@dataclass(frozen=True)
class PoolingPlan:
    """Output grid, window and stride of one pooling call, all as (frames, rows, columns)."""

    output_size: Triple
    kernel: Triple
    stride: Triple

    @property
    def num_tokens(self) -> int:
        return math.prod(self.output_size)

    @property
    def covered_size(self) -> Triple:
        """Extent of the input the windows read; trailing frames/patches beyond it are dropped, as in the original."""
        return tuple((o - 1) * s + k for o, s, k in zip(self.output_size, self.stride, self.kernel))

    def temporal_blocks(self, output_frames_per_block: int) -> Iterator[tuple[slice, slice, "PoolingPlan"]]:
        """Split the plan along time into consecutive blocks of at most `output_frames_per_block` output frames.

        Yields `(output_frames, input_frames, block_plan)`: pooling `input[:, input_frames]` with `block_plan` gives
        `output[:, output_frames]`. Overlapping windows make neighbouring blocks share input frames.
        """
        frames, kernel, stride = self.output_size[0], self.kernel[0], self.stride[0]
        for start in range(0, frames, output_frames_per_block):
            stop = min(start + output_frames_per_block, frames)
            block = replace(self, output_size=(stop - start, *self.output_size[1:]))
            yield slice(start, stop), slice(start * stride, (stop - 1) * stride + kernel), block


def plan_pooling(
    input_size: Triple,
    kernel: Triple | list[int] | None = None,
    stride: Triple | list[int] | None = None,
    output_size: Triple | list[int] | None = None,
) -> PoolingPlan:
    """Window arithmetic of the original `get_size`: either kernel and stride, or an output size (stride = input // output)."""
    if output_size is not None:
        output_size = tuple(int(o) for o in output_size)
        stride = tuple(i // o for i, o in zip(input_size, output_size))
        kernel = tuple(i - (o - 1) * s for i, o, s in zip(input_size, output_size, stride))
    elif kernel is not None and stride is not None:
        kernel, stride = tuple(int(k) for k in kernel), tuple(int(s) for s in stride)
        output_size = tuple((i - k) // s + 1 for i, k, s in zip(input_size, kernel, stride))
    else:
        raise ValueError("Pooling needs either an output size or both a kernel and a stride.")
    if min(output_size) < 1 or min(stride) < 1 or any(k > i for k, i in zip(kernel, input_size)):
        raise ValueError(f"Cannot pool a {tuple(input_size)} grid with kernel {kernel}, stride {stride}, output {output_size}.")
    return PoolingPlan(output_size=output_size, kernel=kernel, stride=stride)


def plan_video_pooling(
    num_frames: int,
    patch_grid: tuple[int, int],
    kernel: Triple | list[int],
    stride: Triple | list[int],
    output_size: Triple | list[int] | None = None,
    max_visual_tokens: int | None = None,
) -> PoolingPlan:
    """Pooling plan of a `num_frames`-frame clip: the configured windows, made to fit short clips and a token budget.

    The model and the processor both call this function, so the placeholder count always equals the token count.

    - Fewer frames than the temporal window: the window shrinks to the clip (one temporal slot).
    - An output size with more frames than the clip: the temporal output shrinks to the clip length.
    - A budget that the plan exceeds: the spatial windows stay and the clip gets at most
      `max_visual_tokens // tokens_per_frame_slot` temporal slots whose windows together cover every frame (see
      `fit_temporal_windows`), so any number of frames gives at most `max_visual_tokens` tokens.
    """
    if num_frames < 1:
        raise ValueError(f"A video needs at least one frame, got {num_frames}.")
    input_size = (num_frames, *patch_grid)
    if output_size is not None:
        output_size = (min(int(output_size[0]), num_frames), int(output_size[1]), int(output_size[2]))
        plan = plan_pooling(input_size, output_size=output_size)
    else:
        temporal_kernel = min(int(kernel[0]), num_frames)
        temporal_stride = min(int(stride[0]), temporal_kernel)
        plan = plan_pooling(
            input_size, kernel=(temporal_kernel, *kernel[1:]), stride=(temporal_stride, *stride[1:])
        )
    if max_visual_tokens is None or plan.num_tokens <= max_visual_tokens:
        return plan
    tokens_per_slot = plan.output_size[1] * plan.output_size[2]
    max_slots = max_visual_tokens // tokens_per_slot
    if max_slots < 1:
        raise ValueError(
            f"max_visual_tokens={max_visual_tokens} is smaller than one pooled frame ({tokens_per_slot} tokens); raise it "
            "or pool the frames more coarsely."
        )
    slots, temporal_kernel, temporal_stride = fit_temporal_windows(num_frames, max_slots)
    return PoolingPlan(
        output_size=(slots, *plan.output_size[1:]),
        kernel=(temporal_kernel, *plan.kernel[1:]),
        stride=(temporal_stride, *plan.stride[1:]),
    )


def fit_temporal_windows(num_frames: int, max_slots: int) -> tuple[int, int, int]:
    """`(slots, kernel, stride)` of equal temporal windows that cover all `num_frames` frames in at most `max_slots` slots.

    Windows that cover the clip exactly satisfy `(slots - 1) * stride + kernel == num_frames` with `stride <= kernel`;
    for a given slot count the widest stride, `num_frames // slots`, gives the shortest window. Using `max_slots` slots
    whatever the remainder can make each window far longer than its stride (47 frames in 16 slots: windows of 17
    frames every 2), which blurs time and multiplies the pooling work. So the rule takes the most slots whose windows
    are at most twice as long as an even split into `max_slots` would give, `ceil(num_frames / max_slots)`:
    47 frames -> 15 windows of 5 frames every 3; 1023 frames -> 16 windows of 78 every 63; 512 -> 16 of 32 every 32.
    """
    if not 1 <= max_slots <= num_frames:
        raise ValueError(f"Cannot fit {num_frames} frames into {max_slots} temporal slots.")
    longest = 2 * math.ceil(num_frames / max_slots)
    for slots in range(max_slots, 0, -1):
        stride = num_frames // slots
        kernel = num_frames - (slots - 1) * stride
        if kernel <= longest:
            return slots, kernel, stride
    raise AssertionError("a single window over the whole clip always fits")


def plan_image_pooling(
    num_tiles: int,
    patch_grid: tuple[int, int],
    kernel: Triple | list[int],
    stride: Triple | list[int],
    output_size: Triple | list[int] | None = None,
) -> PoolingPlan:
    """Pooling plan of an anyres image: its tiles are the frames, each pooled on its own (temporal window 1)."""
    if output_size is not None:
        output_size = (num_tiles, *output_size[1:])
    return plan_pooling((num_tiles, *patch_grid), kernel=kernel, stride=stride, output_size=output_size)


def prompt_guided_pool(
    features: torch.Tensor, relevance: torch.Tensor, plan: PoolingPlan, temperature: float
) -> torch.Tensor:
    """Weighted average over each window, weights = softmax(relevance / temperature) inside the window.

    Args:
        features: `(batch, frames, rows, columns, dim)`, any float dtype.
        relevance: `(batch, frames, rows, columns)`, the prompt relevance of every patch.
        plan: windows and output grid; windows may overlap (stride < kernel).
        temperature: softmax temperature (0.01 in PPLLaVA).

    Returns:
        `(batch, out_frames, out_rows, out_columns, dim)` in the dtype of `features`.

    No unfolded copy of the features is made: each window offset is a strided view of the features, and the weights
    are computed in float32 on the small `(window, batch, *output)` tensor. The products accumulate in float32 (or the
    features' dtype if wider).
    """
    offsets = list(itertools.product(*(range(k) for k in plan.kernel)))
    window_logits = torch.stack([_window_slice(relevance, offset, plan) for offset in offsets]).float() / temperature
    window_weights = torch.softmax(window_logits, dim=0)[..., None]
    if torch.is_grad_enabled() and (features.requires_grad or relevance.requires_grad):
        # Autograd keeps the inputs of every product: views of `features` here, never upcast copies.
        products = (_window_slice(features, offset, plan) * weights for offset, weights in zip(offsets, window_weights))
        return sum(products).to(features.dtype)
    return _accumulate_windows(features, window_weights, offsets, plan)


def _accumulate_windows(
    features: torch.Tensor, window_weights: torch.Tensor, offsets: list[Triple], plan: PoolingPlan
) -> torch.Tensor:
    """Inference path of `prompt_guided_pool`: in-place accumulation, one window offset at a time.

    On CPU the output is built in blocks of output frames small enough for the accumulator to stay in cache, and
    half-precision windows are first upcast into a reused block buffer, several times faster than mixing dtypes in
    `addcmul_`.
    """
    batch, dim = features.shape[0], features.shape[-1]
    pooled = features.new_empty((batch, *plan.output_size, dim))
    accumulator_dtype = torch.promote_types(features.dtype, torch.float32)
    accumulate_in_place = accumulator_dtype == features.dtype
    block_frames = _output_frames_per_block(plan, batch * dim, features.device)
    block_shape = (batch, min(block_frames, plan.output_size[0]), *plan.output_size[1:], dim)
    accumulator = None if accumulate_in_place else features.new_empty(block_shape, dtype=accumulator_dtype)
    upcast = None if accumulate_in_place else features.new_empty(block_shape, dtype=accumulator_dtype)
    for output_frames, input_frames, block in plan.temporal_blocks(block_frames):
        target = pooled[:, output_frames] if accumulate_in_place else accumulator[:, : block.output_size[0]]
        for index, offset in enumerate(offsets):
            window = _window_slice(features[:, input_frames], offset, block)
            if upcast is not None:
                window = upcast[:, : block.output_size[0]].copy_(window)
            weights = window_weights[index, :, output_frames]
            if index == 0:
                torch.mul(window, weights, out=target)
            else:
                target.addcmul_(window, weights)
        if not accumulate_in_place:
            pooled[:, output_frames] = target
    return pooled


# Output elements accumulated per block on CPU: 4 MiB of float32, inside the L3 cache (measured best between 1 and 16 MiB).
_CPU_BLOCK_ELEMENTS = 1 << 20


def _output_frames_per_block(plan: PoolingPlan, elements_per_position: int, device: torch.device) -> int:
    """Output frames accumulated together: all of them on accelerators (fewest launches), a cache-sized block on CPU."""
    if device.type != "cpu":
        return plan.output_size[0]
    per_frame = plan.output_size[1] * plan.output_size[2] * elements_per_position
    return max(1, _CPU_BLOCK_ELEMENTS // per_frame)


def _window_slice(tensor: torch.Tensor, offset: Triple, plan: PoolingPlan) -> torch.Tensor:
    """View of the element at `offset` inside every window: dims 1..3 of `tensor` strided by the plan."""
    slices = tuple(
        slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, plan.output_size, plan.stride)
    )
    return tensor[(slice(None), *slices)]


class PPLLaVAPromptGuidedPooling(nn.Module):
    """PPLLaVA's pooling: 3-D windows whose weights are the prompt relevance, re-softmaxed per window with a temperature."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(
        self, features: torch.Tensor, relevance: torch.Tensor, kernel: Triple, stride: Triple
    ) -> torch.Tensor:
        """Pool `features` `(batch, frames, rows, columns, dim)` with `(frames, rows, columns)` windows of `kernel`
        every `stride`, weighted by `relevance` `(batch, frames, rows, columns)`. Trailing frames or patches that no window reaches are left
        out, as in the original."""
        plan = plan_pooling(tuple(features.shape[1:4]), kernel=kernel, stride=stride)
        return prompt_guided_pool(features, relevance, plan, self.temperature)
