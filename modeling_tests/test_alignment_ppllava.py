"""Vision-prompt alignment: the stretched prompt positions and the relevance weights that drive pooling."""

import pytest
import torch
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from ppllava_hf.conversion.prompt_positions import stretch_position_embeddings
from ppllava_hf.models.ppllava.modeling_ppllava import (
    PPLLaVAExtendedTextEmbeddings,
    PPLLaVASiglipPatchHead,
    PPLLaVAVisionPromptAlignment,
)
from ppllava_hf.testing.tiny import tiny_config


def stretched_by_definition(table: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """The PPLLaVA rule written out row by row: keep, interpolate 4x, extrapolate the last four rows."""
    rows = [table[i] for i in range(keep)]
    for i in range(keep, table.shape[0] - 1):
        for j in range(4):
            rows.append(table[i] * (4 - j) / 4 + table[i + 1] * j / 4)
    for j in range(4):
        rows.append(table[-1] + j * (table[-1] - table[-2]) / 4)
    return torch.stack(rows)


@pytest.mark.parametrize("source_length, stretched_length", [(77, 248), (64, 196)])
def test_stretched_table_equals_its_definition(source_length, stretched_length):
    table = torch.randn(source_length, 16)
    stretched = stretch_position_embeddings(table)
    assert stretched.shape == (stretched_length, 16)
    torch.testing.assert_close(stretched, stretched_by_definition(table), rtol=0, atol=1e-6)
    torch.testing.assert_close(stretched[:20], table[:20], rtol=0, atol=0)


def test_first_positions_come_from_the_base_table_the_rest_from_the_residual():
    embeddings = PPLLaVAExtendedTextEmbeddings(vocab_size=10, hidden_size=4, num_positions=30, keep_positions=20)
    base, residual = torch.randn(30, 4), torch.randn(30, 4)
    embeddings.position_embedding_base.copy_(base)
    with torch.no_grad():
        embeddings.position_embedding_residual.copy_(residual)
        embeddings.token_embedding.weight.zero_()
    out = embeddings(input_ids=torch.zeros(1, 30, dtype=torch.long))[0]
    torch.testing.assert_close(out[:20], base[:20])
    torch.testing.assert_close(out[20:], residual[20:])


def test_base_table_is_frozen_and_residual_is_trainable():
    embeddings = PPLLaVAExtendedTextEmbeddings(vocab_size=10, hidden_size=4, num_positions=30, keep_positions=20)
    assert "position_embedding_base" not in dict(embeddings.named_parameters())
    assert "position_embedding_base" in embeddings.state_dict()
    assert embeddings.position_embedding_residual.requires_grad


def test_a_prompt_longer_than_the_extended_context_is_refused():
    embeddings = PPLLaVAExtendedTextEmbeddings(vocab_size=10, hidden_size=4, num_positions=30, keep_positions=20)
    with pytest.raises(ValueError, match="31 tokens but the prompt encoder has 30 positions"):
        embeddings(input_ids=torch.zeros(1, 31, dtype=torch.long))


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_relevance_is_a_softmax_over_all_patches_of_each_sample(layout):
    torch.manual_seed(0)
    config = tiny_config(layout)
    alignment = PPLLaVAVisionPromptAlignment(config).eval()
    with torch.no_grad():
        alignment.logit_scale.fill_(2.0)
    patches = torch.randn(2, 3, 6, 6, config.vision_config.hidden_size)
    prompts = torch.randn(2, config.vision_config.hidden_size if layout == "qwen" else 40)
    relevance = alignment(patches, prompts)
    assert relevance.shape == (2, 3, 6, 6) and relevance.dtype == torch.float32
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), torch.ones(2))
    cosine = alignment.cosine_similarity(patches, prompts)
    expected = torch.softmax(cosine.flatten(1) * torch.tensor(2.0).exp(), dim=-1).view_as(cosine)
    torch.testing.assert_close(relevance, expected)


def test_relevance_ranks_patches_by_cosine_with_the_prompt():
    config = tiny_config("vicuna")
    alignment = PPLLaVAVisionPromptAlignment(config).eval()
    patches = torch.randn(1, 2, 6, 6, 32)
    prompt = torch.randn(1, 40)
    order_cosine = alignment.cosine_similarity(patches, prompt).flatten().argsort()
    relevance_in_that_order = alignment(patches, prompt).flatten()[order_cosine]
    assert bool((relevance_in_that_order.diff() >= 0).all())  # a softmax keeps the order (ties may form when rounding)
    assert relevance_in_that_order[-1] > relevance_in_that_order[0]


@pytest.mark.parametrize("frozen, expect_grad", [(True, False), (False, True)])
def test_prompt_encoder_runs_without_gradient_when_frozen(frozen, expect_grad):
    config = tiny_config("vicuna", freeze_prompt_encoder=frozen)
    alignment = PPLLaVAVisionPromptAlignment(config)
    ids = torch.randint(0, 120, (2, 248))
    alignment.encode_prompt(ids).sum().backward()
    encoder_grad = alignment.text_model.encoder.layers[0].mlp.fc1.weight.grad
    assert (encoder_grad is not None) == expect_grad
    assert alignment.text_projection.weight.grad is not None


def test_siglip_patch_head_applies_the_attention_pooling_head_to_every_patch():
    vision = tiny_config("qwen").vision_config
    stock = SiglipMultiheadAttentionPoolingHead(vision).eval()
    head = PPLLaVASiglipPatchHead(vision).eval()
    dim = vision.hidden_size
    with torch.no_grad():
        head.value_proj.weight.copy_(stock.attention.in_proj_weight[2 * dim :])
        head.value_proj.bias.copy_(stock.attention.in_proj_bias[2 * dim :])
        head.layernorm.load_state_dict(stock.layernorm.state_dict())
        head.mlp.load_state_dict(stock.mlp.state_dict())
    patches = torch.randn(3, 5, dim)
    values = torch.nn.functional.linear(patches, stock.attention.in_proj_weight[2 * dim :], stock.attention.in_proj_bias[2 * dim :])
    expected = values + stock.mlp(stock.layernorm(values))
    torch.testing.assert_close(head(patches), expected)
