"""Token counts shared by the model and the processor: prompt-guided pooling windows and the anyres image layout.

Pure arithmetic (no torch): the processor expands each placeholder to exactly the number of tokens the model produces
because both call these functions.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from transformers.image_processing_utils import select_best_resolution


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


def num_multi_image_tokens(
    patch_grid: tuple[int, int],
    kernel: Triple | list[int],
    stride: Triple | list[int],
    output_size: Triple | list[int] | None = None,
) -> int:
    """Visual tokens of each image of a multi-image group (what each of its placeholders expands to): the image squashed
    to one tile and pooled with the image windows; no `image_newline`."""
    return plan_image_pooling(1, patch_grid, kernel, stride, output_size).num_tokens


# ---------------------------------------------------------------------------------------------------------------------
# Anyres images (LLaVA-NeXT tiling)


def anyres_grid_shape(image_size: tuple[int, int], grid_pinpoints: list[list[int]], tile_size: int) -> tuple[int, int]:
    """(rows, columns) of tiles LLaVA-NeXT cuts an image of `image_size` (height, width) into."""
    height, width = select_best_resolution([int(v) for v in image_size], grid_pinpoints)
    return height // tile_size, width // tile_size


def num_anyres_tiles(image_size: tuple[int, int], grid_pinpoints: list[list[int]], tile_size: int) -> int:
    """Tiles per image: the resized base image plus the grid."""
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, tile_size)
    return 1 + rows * cols


def unpadded_size(height: int, width: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Crop of a (height, width) feature map that removes the letterbox padding of an `image_size` image.

    Returns (top, bottom, left, right) bounds. The kept size is truncated (`int(x)`), as by the `unpad_image` of the
    transformers releases PPLLaVA was trained with (4.45/4.46); later releases round first (`int(round(x, 7))`), which
    keeps a different number of rows or columns for some aspect ratios (e.g. 147x196 on a 4x4 grid: 2 rows, not 4).
    """
    original_height, original_width = (int(v) for v in image_size)
    if original_width / original_height > width / height:
        new_height = int(original_height * (width / original_width))
        padding = (height - new_height) // 2
        return padding, height - padding, 0, width
    new_width = int(original_width * (height / original_height))
    padding = (width - new_width) // 2
    return 0, height, padding, width - padding


def num_image_tokens(
    image_size: tuple[int, int],
    grid_pinpoints: list[list[int]],
    tile_size: int,
    patch_grid: tuple[int, int],
    kernel: list[int],
    stride: list[int],
    output_size: list[int] | None = None,
) -> int:
    """Visual tokens of one anyres image (what its placeholder expands to): its tiles pooled per `plan_image_pooling`,
    then laid out as `pack_image_tokens` does. The model's check and the processor's expansion both call this."""
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, tile_size)
    plan = plan_image_pooling(1 + rows * cols, patch_grid, kernel, stride, output_size)
    tile_rows, tile_cols = plan.output_size[1:]
    top, bottom, left, right = unpadded_size(rows * tile_rows, cols * tile_cols, image_size)
    return tile_rows * tile_cols + (bottom - top) * (right - left + 1)
