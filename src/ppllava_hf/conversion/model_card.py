"""Model cards for converted PPLLaVA checkpoints: Hub metadata, what the model is made of, how to load and run it,
where it was converted from, and the citation."""

from huggingface_hub import ModelCard, ModelCardData

from ..models.ppllava.configuration_ppllava import PPLLaVAConfig


PPLLAVA_PAPER = "https://arxiv.org/abs/2411.02327"
PPLLAVA_CITATION = """@article{liu2024ppllava,
  title={PPLLaVA: Varied Video Sequence Understanding With Prompt Guidance},
  author={Liu, Ruyang and Tang, Haoran and Liu, Haibo and Ge, Yixiao and Shan, Ying and Li, Chen and Yang, Jiankun},
  journal={arXiv preprint arXiv:2411.02327},
  year={2024}
}"""

_TEMPLATE = """---
{{ card_data }}
---

# PPLLaVA: {{ name }}

[PPLLaVA]({{ paper }}) is a video LLM that compresses the visual tokens of a video (or image) under the guidance of the
user's prompt: every patch is scored against the prompt by a CLIP/SigLIP text encoder with a stretched context, and
3-D windows over (frames, rows, columns) are pooled with those scores before the language model reads them.

This is the original PPLLaVA checkpoint {{ origin }} ([code](https://github.com/farewellthree/PPLLaVA)) converted to
the Transformers-native `ppllava_hf` layout: safetensors weights under the PPLLaVA-HF names, a `PPLLaVAConfig`, and the
original generation config.

| Part | |
|---|---|
| Vision tower | {{ vision }} |
| Prompt encoder | {{ prompt_encoder }} |
| Language model | {{ language_model }} |
| Pooling | {{ pooling }} |
| Placeholders | image token id {{ image_token_id }}, video token id {{ video_token_id }} |

## Usage

{{ loading_note }}

```python
{{ snippet }}
```

## Conversion

Converted from {{ origin }} with `convert_checkpoints.py` of ppllava_hf, which renames every original key (or drops it
with a stated reason), checks every shape, and refuses checkpoints it cannot reproduce.

## Citation

```bibtex
{{ citation }}
```
"""

_LOAD_WITH_REMOTE_CODE = "The modeling code ships with the checkpoint: load it with `trust_remote_code=True`."
_LOAD_WITH_PACKAGE = "Install the `ppllava_hf` package; importing it registers PPLLaVA with the Auto classes."

_PROCESSOR_SNIPPET = """import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
{import_package}
model = AutoModelForImageTextToText.from_pretrained("{model_id}", dtype=torch.bfloat16{trust})
processor = AutoProcessor.from_pretrained("{model_id}"{trust})

messages = [
    {{"role": "user", "content": [{{"type": "video", "path": "video.mp4"}}, {{"type": "text", "text": "What happens in this video?"}}]}},
]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device)
output = model.generate(**inputs, max_new_tokens=128)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])"""

_MANUAL_SNIPPET = """import torch
from transformers import AutoModelForImageTextToText
{import_package}
model = AutoModelForImageTextToText.from_pretrained("{model_id}", dtype=torch.float32{trust})
config = model.config

# This checkpoint has no processor, so the inputs are built by hand. A video is (frames, 3, height, width), preprocessed
# as for the vision tower; its placeholder is expanded to as many video tokens as its pooled frames give.
num_frames = 16
size = config.vision_config.image_size
pixel_values_videos = torch.randn(1, num_frames, 3, size, size)
num_video_tokens = model.model.video_pooling_plan(num_frames).num_tokens
# Ids of the LLM tokenizer around the video, and of the CLIP/SigLIP tokenizer for the prompt that guides the pooling.
input_ids = torch.tensor([[15, 16] + [config.video_token_id] * num_video_tokens + [17]])
clip_input_ids = torch.tensor([[15, 16, 17]])

output = model.generate(
    input_ids=input_ids,
    pixel_values_videos=pixel_values_videos,
    clip_input_ids=clip_input_ids,
    clip_attention_mask=torch.ones_like(clip_input_ids),
    max_new_tokens=5,
)
print(output[0, input_ids.shape[1]:])"""


def usage_snippet(model_id: str, has_processor: bool, remote_code: bool) -> str:
    """Python code that loads the converted model and generates from a video, with the processor when there is one."""
    template = _PROCESSOR_SNIPPET if has_processor else _MANUAL_SNIPPET
    return template.format(
        model_id=model_id,
        trust=", trust_remote_code=True" if remote_code else "",
        import_package="" if remote_code else "import ppllava_hf  # registers PPLLaVA with the Auto classes\n",
    )


def _describe(config: PPLLaVAConfig) -> dict[str, str]:
    vision, text, prompt = config.vision_config, config.text_config, config.prompt_encoder_config
    tower = (
        f"`{vision.model_type}`, {vision.num_hidden_layers} layers, {vision.image_size}px frames in "
        f"{vision.patch_size}px patches"
    )
    if config.use_btadapter:
        tower += f", with a BT-Adapter temporal branch on the last {config.btadapter_depth} layers"
    return {
        "vision": tower,
        "prompt_encoder": f"`{prompt.model_type}`, {prompt.num_hidden_layers} layers, {prompt.max_position_embeddings} positions",
        "language_model": f"`{text.model_type}`, {text.num_hidden_layers} layers, hidden size {text.hidden_size}",
        "pooling": (
            f"videos: kernel {config.video_pooling_kernel} / stride {config.video_pooling_stride}; images: kernel "
            f"{config.image_pooling_kernel} / stride {config.image_pooling_stride}; temperature {config.pooling_temperature}"
        ),
    }


def build_model_card(
    config: PPLLaVAConfig,
    origin: str,
    model_id: str,
    base_model: str | None = None,
    has_processor: bool = False,
    remote_code: bool = False,
) -> ModelCard:
    """Model card of a converted checkpoint.

    Args:
        config: the converted config (the card describes its parts and pooling).
        origin: the original checkpoint it came from, e.g. `farewellthree/ppllava_weight/ppllava_vicuna7b_image_video`.
        model_id: Hub id (or folder) the converted model is loaded from in the usage snippet.
        base_model: Hub repo of the original weights, for the `base_model` metadata.
        has_processor: whether the folder has a processor (the snippet then uses it; else it builds inputs by hand).
        remote_code: whether the folder carries its modeling code (`trust_remote_code=True` instead of `import ppllava_hf`).
    """
    tags = ["ppllava", "video-llm", "video-text-to-text", "image-text-to-text", "multimodal"]
    if remote_code:
        tags.append("custom_code")
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        base_model=base_model,
        tags=tags,
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        name=origin.rstrip("/").split("/")[-1],
        paper=PPLLAVA_PAPER,
        origin=f"`{origin}`",
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        loading_note=_LOAD_WITH_REMOTE_CODE if remote_code else _LOAD_WITH_PACKAGE,
        snippet=usage_snippet(model_id, has_processor, remote_code),
        citation=PPLLAVA_CITATION,
        **_describe(config),
    )
