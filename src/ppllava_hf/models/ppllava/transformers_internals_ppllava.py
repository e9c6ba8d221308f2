"""Every transformers internal the PPLLaVA model files build on, in one place.

Each name here is something transformers offers no public equivalent for; the model, processor and video processor
import it from this module only, so that when a transformers release moves one of them there is a single place to
mend. `modeling_tests/test_transformers_contracts.py` pins the contract each one is used under and names the
transformers change when one breaks. The processor also overrides one private hook, `ProcessorMixin._process_images`
(the images -> pixels and placeholder expansions step, which transformers' own processors override for their image
layouts), for the multi-image mode, and implements `_get_num_multimodal_tokens` (the token counts by media size that
transformers' processors give serving engines, as a `processing_utils.MultiModalData`, with the call's options sorted
by `ProcessorMixin._merge_kwargs`); the same test file pins both. Everything else the model files use is transformers'
public API.
"""

import torch
from torch import nn

# Slices the hidden states to the positions whose logits are wanted. Its contract (an int, positions, or a boolean
# mask) grows with what `generate` and trl pass as `logits_to_keep`, so the installed version is the one to call.
from transformers.modeling_utils import slice_logits_to_keep

# The Auto class of video processors, to register PPLLaVA's: the top-level name is a placeholder without torchvision.
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

# The attention and MLP blocks of the CLIP/SigLIP towers: the BT-Adapter and the SigLIP per-patch head are built from
# them so that their weights load from the original checkpoints and they run on every attention back-end.
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention
from transformers.models.siglip.modeling_siglip import SiglipMLP

# The base class of video processors. transformers exports it at the top level only when torchvision is installed,
# which PPLLaVA does not depend on; the submodule has it always.
from transformers.video_processing_utils import VideoProcessorMixin


def replace_text_embeddings(text_model: nn.Module, embeddings: nn.Module) -> None:
    """Make the stock CLIP/SigLIP `text_model` use `embeddings` for its token and position embeddings.

    PPLLaVA extends the prompt encoder's context (77 -> 248 positions, 64 -> 196) with two position tables, a frozen
    base for the first positions and a trainable residual for the rest, which no transformers text model has. The
    stock models embed their input with `self.embeddings(input_ids=..., position_ids=...)`, so swapping that one
    submodule keeps the rest of the stock encoder (layers, attention back-ends, pooling) and the checkpoints' key names.
    """
    if not isinstance(getattr(text_model, "embeddings", None), nn.Module):
        raise TypeError(
            f"{type(text_model).__name__} has no `embeddings` submodule to extend: this transformers version changed the "
            "layout of its text models, which PPLLaVA's prompt encoder relies on (see transformers_internals_ppllava)."
        )
    text_model.embeddings = embeddings


def vision_position_embeddings(vision_tower: nn.Module) -> torch.Tensor:
    """The CLIP vision tower's position table `(1 + patches, hidden)`: the BT-Adapter adds it to its branch tokens, as
    the original does. No public accessor returns the table itself."""
    return vision_tower.embeddings.position_embedding.weight


__all__ = [
    "AutoVideoProcessor",
    "CLIPAttention",
    "CLIPMLP",
    "SiglipMLP",
    "VideoProcessorMixin",
    "replace_text_embeddings",
    "slice_logits_to_keep",
    "vision_position_embeddings",
]
