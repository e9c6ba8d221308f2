"""LLaVA-NeXT anyres layout of pooled image tiles: grid choice, unpadding and `image_newline` packing.

The token count (used by the processor) and the packing (used by the model) share `unpadded_size`, so a placeholder is
always expanded to exactly the number of vectors the model scatters into it.
"""

import torch
from transformers.image_processing_utils import select_best_resolution

from .pooling_ppllava import plan_image_pooling


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

    Returns (top, bottom, left, right) bounds, with the same rounding as LLaVA-NeXT's `unpad_image`.
    """
    original_height, original_width = (int(v) for v in image_size)
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        padding = (height - new_height) // 2
        return padding, height - padding, 0, width
    new_width = int(round(original_width * (height / original_height), 7))
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


def pack_image_tokens(
    pooled_tiles: torch.Tensor,
    image_size: tuple[int, int],
    grid_pinpoints: list[list[int]],
    tile_size: int,
    image_newline: torch.Tensor,
) -> torch.Tensor:
    """Lay pooled tiles `(tiles, rows, columns, dim)` out as LLaVA-NeXT does: base tile, then the unpadded grid row by row
    with an `image_newline` after every row. A single-tile input gets one `image_newline` at the end."""
    dim = pooled_tiles.shape[-1]
    newline = image_newline.to(pooled_tiles.dtype)
    base = pooled_tiles[0].reshape(-1, dim)
    if pooled_tiles.shape[0] == 1:
        return torch.cat([base, newline[None]], dim=0)
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, tile_size)
    tile_rows, tile_cols = pooled_tiles.shape[1:3]
    grid = pooled_tiles[1:].reshape(rows, cols, tile_rows, tile_cols, dim).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * tile_rows, cols * tile_cols, dim)
    top, bottom, left, right = unpadded_size(grid.shape[0], grid.shape[1], image_size)
    grid = grid[top:bottom, left:right]
    grid = torch.cat([grid, newline.expand(grid.shape[0], 1, dim)], dim=1)
    return torch.cat([base, grid.reshape(-1, dim)], dim=0)
