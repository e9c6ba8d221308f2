"""Checks of the tensors handed to the PPLLaVA model, where they enter it: a dtype, layout or range mistake raises a
`ValueError` that names the argument and the fix, instead of an error deep inside torch or a silently wrong answer.

Checks that read tensor values (token id ranges, mask rows) are skipped while torch.compile traces.
"""

import json
import os

import torch


def check_pixel_values(pixels: torch.Tensor, name: str, image_size: int) -> None:
    """`pixels` must be normalised float frames `(..., 3, image_size, image_size)`, as the processor returns them."""
    if not pixels.is_floating_point():
        raise ValueError(
            f"{name} has dtype {pixels.dtype}, but the model takes normalised float pixels (raw 0..255 frames would run "
            "as if normalised). Pass the frames through the PPLLaVA processor (or its video / image processor), which "
            "resizes, rescales and normalises them."
        )
    expected = (3, image_size, image_size)
    if tuple(pixels.shape[-3:]) == expected:
        return
    shape = tuple(pixels.shape)
    if pixels.ndim >= 3 and pixels.shape[-1] == 3:
        order = list(range(pixels.ndim - 3)) + [pixels.ndim - 1, pixels.ndim - 3, pixels.ndim - 2]
        fix = (
            f"it looks channels-last (..., height, width, 3): move the channels before the height and width, e.g. "
            f"{name}.permute({', '.join(map(str, order))})"
        )
    else:
        fix = "resize the frames to the vision tower's input size with the PPLLaVA processor"
    raise ValueError(f"{name} has shape {shape}, but each frame must be {expected} (channels, height, width): {fix}.")


def check_pixel_batch(pixels: torch.Tensor | list[torch.Tensor], name: str, image_size: int) -> None:
    """`check_pixel_values` for a batch given as one tensor, or as a list of tensors (named `name[i]`)."""
    if isinstance(pixels, torch.Tensor):
        check_pixel_values(pixels, name, image_size)
        return
    for index, item in enumerate(pixels):
        check_pixel_values(item, f"{name}[{index}]", image_size)


def check_token_ids(ids: torch.Tensor, name: str, vocab_size: int, tokenizer: str) -> None:
    """`ids` must be integer token ids below `vocab_size` (the embedding rows of the model part that reads them)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"{name} has dtype {ids.dtype}, but token ids are integers (torch.long); tokenize the text with the "
            f"{tokenizer} instead of passing other values."
        )
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{name} holds ids from {low} to {high}, but the vocabulary has {vocab_size} tokens (ids 0 to "
            f"{vocab_size - 1}): tokenize with the {tokenizer}."
        )


def check_attended_rows(attention_mask) -> None:
    """Every sample of a 2-D `attention_mask` must attend to at least one token (other masks are left alone)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or torch.compiler.is_compiling():
        return
    empty = (attention_mask == 0).all(-1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Row(s) {empty} of attention_mask are all zeros: those samples have no token to attend to, and would be "
            "read as padding only. Drop them from the batch, or give them a mask with 1 for each real token."
        )


def check_labels(labels: torch.Tensor, input_shape: torch.Size) -> None:
    """`labels` must have one target per input position `(batch, sequence)`."""
    if tuple(labels.shape) != tuple(input_shape[:2]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but the inputs {tuple(input_shape[:2])}: build the labels from the "
            "processor's input_ids, in which every <video> / <image> placeholder is expanded to the model's visual "
            "tokens (e.g. labels = inputs['input_ids'].clone(), with -100 where no loss is wanted), not from the "
            "unexpanded text."
        )



# bitsandbytes' 4-bit data types (`bitsandbytes.functional.quantize_4bit`); another name fails only half-way through
# loading, in transformers' conversion report.
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")


def check_quantization_config(quantization_config) -> None:
    """A 4-bit bitsandbytes `quantization_config` (a `BitsAndBytesConfig` or its dict) must name a data type that
    bitsandbytes has, checked when the model is built, before any weight is loaded."""
    if quantization_config is None:
        return
    values = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    quant_type = values.get("bnb_4bit_quant_type", "nf4")
    if values.get("load_in_4bit") and quant_type not in BNB_4BIT_QUANT_TYPES:
        raise ValueError(
            f"BitsAndBytesConfig(bnb_4bit_quant_type={quant_type!r}) is not a 4-bit type bitsandbytes knows: use "
            f"{' or '.join(map(repr, BNB_4BIT_QUANT_TYPES))} (NF4 is the QLoRA default)."
        )


def check_weight_files(folder: str) -> None:
    """Every `*.safetensors` file of a local model `folder` must hold the tensors its header declares: a truncated or
    damaged file otherwise fails inside safetensors ("incomplete metadata, file not fully covered"), naming no file."""
    if not os.path.isdir(folder):
        return  # a Hub id: downloads are checked by the Hub client
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors") and os.path.isfile(path):
            problem = _safetensors_problem(path)
            if problem:
                raise ValueError(f"Cannot read the weight file {path}: {problem}. Download or save the model again.")


def _safetensors_problem(path: str) -> str | None:
    """What is wrong with a safetensors file, read from its header (8 bytes of length, then JSON) and its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or 8 + length > size:
            return f"it is {size} bytes, shorter than its header: the file is truncated"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header: the file is damaged, or no safetensors file"
    if 8 + length + end > size:
        return f"its tensors need {8 + length + end} bytes but the file has {size}: the file is truncated"
    return None
