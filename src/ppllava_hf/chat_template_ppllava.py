"""Chat templates reproducing PPLLaVA's conversation formats (`ppllava/conversation/conv.py`).

- `VICUNA_V1_CHAT_TEMPLATE` (`plain_v1`, Llama/Vicuna backbone): `USER: <video>\nQuestion? ASSISTANT: Answer</s>USER: ...`
- `CHATML_CHAT_TEMPLATE` (`plain_qwen`, Qwen2 backbone):
  `<|im_start|>user\n<video>\nQuestion?<|im_end|>\n<|im_start|>assistant\nAnswer<|im_end|>\n...`

As in the original, a user turn lists its visual placeholders (one `<video>` / `<image>` per content block, in order)
then a newline, then its text (text blocks joined by newlines); a system message is its text followed by the user
separator (`" "`, or `"<|im_end|>\n"` without an `<|im_start|>system` header, exactly as `conv.py` renders it). Every
assistant turn ends with its separator (`</s>` / `<|im_end|>`): `conv.py` leaves it off a final assistant message only
because at inference the prompt ends with the assistant role; its training data does append the EOS. The assistant
text and separator are marked with `{% generation %}` for `return_assistant_tokens_mask=True`.
"""


def _conversation_template(
    system_end: str, user_start: str, user_end: str, assistant_start: str, assistant_end: str, assistant_after: str
) -> str:
    """A Jinja chat template in PPLLaVA's layout with the given role markers (Jinja string-literal syntax)."""
    return (
        "{%- for message in messages -%}"
        "{%- set ns = namespace(media='', texts=[]) -%}"
        "{%- if message['content'] is string -%}{%- set ns.texts = [message['content']] -%}"
        "{%- else -%}{%- for block in message['content'] -%}"
        "{%- if block['type'] == 'video' -%}{%- set ns.media = ns.media + '<video>' -%}"
        "{%- elif block['type'] == 'image' -%}{%- set ns.media = ns.media + '<image>' -%}"
        "{%- elif block['type'] == 'text' -%}{%- set ns.texts = ns.texts + [block['text']] -%}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- set text = ns.texts | join('\\n') -%}"
        "{%- if message['role'] == 'system' -%}{{ text + '" + system_end + "' }}"
        "{%- elif message['role'] == 'user' -%}"
        "{{ '" + user_start + "' }}{% if ns.media %}{{ ns.media + '\\n' }}{% endif %}{{ text + '" + user_end + "' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ '" + assistant_start + "' }}"
        "{% generation %}{{ text + '" + assistant_end + "' }}{% endgeneration %}{{ '" + assistant_after + "' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '" + assistant_start + "' }}{%- endif -%}"
    )


VICUNA_V1_CHAT_TEMPLATE = _conversation_template(" ", "USER: ", " ", "ASSISTANT: ", "</s>", "")
CHATML_CHAT_TEMPLATE = _conversation_template(
    "<|im_end|>\\n", "<|im_start|>user\\n", "<|im_end|>\\n", "<|im_start|>assistant\\n", "<|im_end|>", "\\n"
)


def default_chat_template(text_model_type: str) -> str:
    """PPLLaVA's template for a language model type: ChatML for Qwen models, Vicuna v1 otherwise."""
    return CHATML_CHAT_TEMPLATE if text_model_type.startswith("qwen") else VICUNA_V1_CHAT_TEMPLATE


def last_user_text(conversation: list[dict]) -> str:
    """Text of the last user turn of a conversation (text blocks joined by newlines), as the template renders it."""
    for message in reversed(conversation):
        if message.get("role") == "user":
            content = message.get("content") or []
            if isinstance(content, str):
                return content
            return "\n".join(block["text"] for block in content if block.get("type") == "text")
    return ""
