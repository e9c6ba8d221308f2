"""The original's context extension of the prompt encoder: keep the first 20 text positions of CLIP (SigLIP), stretch
the others 4x by interpolation (77 -> 248, 64 -> 196). Conversion starts PPLLaVA's two position tables from it."""

import torch


ORIGINAL_PROMPT_KEEP_POSITIONS = 20
ORIGINAL_PROMPT_STRETCH = 4


def stretched_length(source_positions: int) -> int:
    """How many positions a `source_positions`-row table has once stretched."""
    return ORIGINAL_PROMPT_KEEP_POSITIONS + ORIGINAL_PROMPT_STRETCH * (source_positions - ORIGINAL_PROMPT_KEEP_POSITIONS)


def stretch_position_embeddings(
    table: torch.Tensor, keep: int = ORIGINAL_PROMPT_KEEP_POSITIONS, factor: int = ORIGINAL_PROMPT_STRETCH
) -> torch.Tensor:
    """Stretch a text position table the PPLLaVA way: keep the first `keep` rows, interpolate the rest `factor`x.

    Rows between consecutive kept positions are linear interpolations; the last `factor` rows extrapolate along the last
    difference. A 77-row CLIP table becomes 20 + 4 * 57 = 248 rows; a 64-row SigLIP table becomes 196.
    """
    length, dim = table.shape
    if not 0 < keep < length - 1:
        raise ValueError(f"keep={keep} must leave at least two positions of the {length}-row table to interpolate.")
    source = table.float()
    fractions = torch.arange(factor, dtype=torch.float32, device=table.device) / factor
    left, right = source[keep:-1, None], source[keep + 1 :, None]
    interpolated = left + fractions[:, None] * (right - left)
    extrapolated = source[-1] + fractions[:, None] * (source[-1] - source[-2])
    stretched = torch.cat([source[:keep], interpolated.reshape(-1, dim), extrapolated], dim=0)
    return stretched.to(table.dtype)
