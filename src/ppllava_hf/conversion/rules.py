"""Conversion of checkpoints saved by the original PPLLaVA code (`LlavaInterleaveForConditionalGeneration`) to PPLLaVA-HF.

Two original layouts exist: `llava_next` (CLIP ViT-L/14-336 + BT-Adapter + Vicuna) and `llava_onevision` (SigLIP + Qwen2).
Both keep their weights under `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.*` and
`image_newline`. Every original key is renamed by exactly one rule below or dropped by a rule that says why; anything
else is an error, as is a key of ours that no original key fills or a shape that does not match.
"""

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration
from .prompt_positions import ORIGINAL_PROMPT_KEEP_POSITIONS, stretched_length


ORIGINAL_LAYOUTS = ("llava_next", "llava_onevision")

_PROMPT = "model.prompt_alignment"
_OURS = r"\g<rest>"


def siglip_head_rules(source: str, target: str) -> list[tuple[str, str | None]]:
    """Key rules of SigLIP's attention-pooling head (under the regex prefix `source`) for PPLLaVA's per-patch head
    (under `target`). PPLLaVA reads only the value rows of the attention input projection (`siglip_value_rows`), the
    layernorm and the MLP; the probe, the query/key rows and the output projection serve the pooled probe output, which
    PPLLaVA never uses."""
    return [
        (rf"^{source}attention\.in_proj_(?P<rest>weight|bias)$", target + "value_proj." + _OURS),
        (rf"^{source}probe$", None),
        (rf"^{source}attention\.out_proj\..+$", None),
        (rf"^{source}(?P<rest>(layernorm|mlp)\..+)$", target + _OURS),
    ]


def siglip_value_rows(in_proj: torch.Tensor) -> torch.Tensor:
    """The value third of SigLIP's packed query/key/value attention input projection (weight or bias)."""
    return in_proj[2 * in_proj.shape[0] // 3 :].clone()


def as_scalar(tensor: torch.Tensor) -> torch.Tensor:
    """A temperature or bias as the scalar PPLLaVA stores: SigLIP keeps them as 1-element vectors, CLIP as scalars."""
    return tensor.reshape(())


def apply_key_rules(key: str, rules: list[tuple[str, str | None]]) -> str | None:
    """The first matching rule's name for `key` (None: dropped on purpose); `KeyError` when no rule matches."""
    for pattern, replacement in rules:
        match = re.match(pattern, key)
        if match:
            return None if replacement is None else match.expand(replacement)
    raise KeyError(key)


def free_video_token_id(image_token_id: int, vocab_size: int, *owners) -> int:
    """The first embedding row after the image token that none of `owners` (configs, or their dicts) uses as pad, BOS
    or EOS: where a checkpoint without its own video placeholder (LLaVA-NeXT's) puts it."""
    names = ("pad_token_id", "bos_token_id", "eos_token_id")
    taken = set()
    for value in (owner.get(name) if isinstance(owner, dict) else getattr(owner, name, None) for owner in owners for name in names):
        taken.update(value if isinstance(value, (list, tuple)) else [value])
    candidate = image_token_id + 1
    while candidate in taken:
        candidate += 1
    if candidate >= vocab_size:
        raise ValueError(
            f"The vocabulary ({vocab_size} rows) has no free row after id {image_token_id} for the video placeholder: "
            "pass video_token_id=<a row your tokenizer does not use>, or grow the embeddings first "
            "(resize_token_embeddings)."
        )
    return candidate


# (pattern, replacement); a replacement of None drops the key. The first matching rule wins.
KEY_RULES: list[tuple[str, str | None]] = [
    (r"^language_model\.model\.(?P<rest>.+)$", "model.language_model." + _OURS),
    (r"^language_model\.lm_head\.(?P<rest>.+)$", "lm_head." + _OURS),
    (r"^image_newline$", "model.image_newline"),
    # BT-Adapter branch, which the original keeps inside its CLIP vision transformer.
    (r"^vision_tower\.vision_model\.btadapter_S_layers\.(?P<rest>.+)$", "model.btadapter.spatial_layers." + _OURS),
    (r"^vision_tower\.vision_model\.btadapter_T_layers\.(?P<rest>.+)$", "model.btadapter.temporal_layers." + _OURS),
    (r"^vision_tower\.vision_model\.btadapter_time_embed\.weight$", "model.btadapter.time_embedding.weight"),
    (r"^vision_tower\.vision_model\.btadapter_cls_token$", "model.btadapter.cls_token"),
    # transformers v5 vision models have no `vision_model` wrapper.
    (r"^vision_tower\.vision_model\.(?P<rest>.+)$", "model.vision_tower." + _OURS),
    (r"^multi_modal_projector\.linear_(?P<rest>[12]\..+)$", "model.multi_modal_projector.linear_" + _OURS),
    # Extended prompt positions: `position_embedding` (frozen) is our base table, `_res` the trainable residual.
    (r"^multi_modal_projector\.clip_text_model\.embeddings\.position_embedding$",
     _PROMPT + ".text_model.embeddings.position_embedding_base"),
    (r"^multi_modal_projector\.clip_text_model\.embeddings\.position_embedding_res$",
     _PROMPT + ".text_model.embeddings.position_embedding_residual"),
    # Position-id buffers are rebuilt from the config; they carry no weights.
    (r"^.*\.position_ids$", None),
    (r"^multi_modal_projector\.clip_text_model\.(?P<rest>.+)$", _PROMPT + ".text_model." + _OURS),
    (r"^multi_modal_projector\.clip_text_projection\.(?P<rest>.+)$", _PROMPT + ".text_projection." + _OURS),
    (r"^multi_modal_projector\.clip_visual_projection\.(?P<rest>.+)$", _PROMPT + ".visual_projection." + _OURS),
    (r"^multi_modal_projector\.clip_visual_ln\.(?P<rest>.+)$", _PROMPT + ".visual_layernorm." + _OURS),
    (r"^multi_modal_projector\.logit_scale$", _PROMPT + ".logit_scale"),
    (r"^multi_modal_projector\.logit_bias$", _PROMPT + ".logit_bias"),
    *siglip_head_rules(r"multi_modal_projector\.clip_visual_head\.", _PROMPT + ".visual_projection."),
    # Rotary caches of old Llama checkpoints are recomputed.
    (r"^.*\.rotary_emb\.inv_freq$", None),
]

_SCALAR_KEY = re.compile(r"^multi_modal_projector\.logit_(scale|bias)$")
_VALUE_ROWS_KEY = re.compile(r"^multi_modal_projector\.clip_visual_head\.attention\.in_proj_(weight|bias)$")


class ConversionError(ValueError):
    """A checkpoint does not convert: unknown, missing or mis-shaped keys, an unsupported original setting, a file
    that cannot be read, or an output that cannot be written."""


def read_json(path: str) -> dict:
    """A JSON object file; `ConversionError` naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); restore the file (download it again).") from None
    if not isinstance(content, dict):
        raise ConversionError(f"{path} holds a JSON {type(content).__name__}, not the object a config is.")
    return content


def convert_key(key: str) -> str | None:
    """Our name for an original key, or None when the key is dropped on purpose."""
    try:
        return apply_key_rules(key, KEY_RULES)
    except KeyError:
        raise ConversionError(f"No conversion rule for the original key {key!r}.") from None


def convert_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Tensor content changes some keys need: the value rows of SigLIP's packed attention input projection, and the
    temperature/bias as scalars."""
    if _VALUE_ROWS_KEY.match(key):
        return siglip_value_rows(tensor)
    if _SCALAR_KEY.match(key):
        return as_scalar(tensor)
    return tensor


def _free_video_row(original: dict, image_token_id: int) -> int:
    try:
        return free_video_token_id(image_token_id, original["text_config"]["vocab_size"], original, original["text_config"])
    except ValueError as error:
        raise ConversionError(str(error)) from None


# What convert_config reads without a default.
_REQUIRED_FIELDS = ("text_config", "vision_config", "image_token_index")


def _check_supported(original: dict) -> None:
    """Refuse incomplete configs, and original settings whose computation PPLLaVA-HF does not reproduce instead of
    converting them wrongly."""
    missing = [name for name in _REQUIRED_FIELDS if not original.get(name)]
    if "vocab_size" not in (original.get("text_config") or {"vocab_size": None}):
        missing.append("text_config.vocab_size")
    if missing:
        raise ConversionError(
            f"The checkpoint's config.json has no {', '.join(missing)}: it is not a complete original PPLLaVA config "
            "(a llava_next / llava_onevision config with PPLLaVA's fields, as the original code saves it)."
        )
    if original.get("pooling") != "ppllava":
        # The original's other modes ("avp", "none", "pllava", "pllava_npu") are its baselines: every published recipe
        # (config/*/*.yaml) uses prompt-guided pooling.
        raise ConversionError(
            f"Only prompt-guided pooling checkpoints convert (`pooling: ppllava`, what every published PPLLaVA recipe "
            f"uses); this one has pooling={original.get('pooling')!r}."
        )
    layout = original.get("model_type")
    if layout not in ORIGINAL_LAYOUTS:
        raise ConversionError(f"Unknown original layout model_type={layout!r}; expected one of {ORIGINAL_LAYOUTS}.")
    if original.get("qwen", False) and not original.get("extend_clip", False):
        # The original's SigLIP projector builds a CLIPModel in that case and then reads a SigLIP pooling head it lacks.
        raise ConversionError(
            "`extend_clip: false` with the SigLIP projector (`qwen: true`) cannot have been trained: the original code "
            "fails to build that model."
        )
    if original.get("valuew_plus", False):
        # `valuew_plus` multiplies the relevance by SigLIP's probe attention, which PPLLaVA-HF does not compute.
        raise ConversionError(
            "`valuew_plus: true` (probe-attention weighting of the relevance) is not supported: no published PPLLaVA "
            "recipe sets it."
        )


def convert_config(original: dict, prompt_source: dict) -> PPLLaVAConfig:
    """PPLLaVA-HF config from an original `config.json` and the `config.json` of the CLIP/SigLIP model its
    `clip_weight` names (a `CLIPConfig`/`SiglipConfig` dict: the prompt encoder's architecture is only recorded there).

    The prompt source goes through transformers' own config class so that its legacy fields (`text_config_dict`) and
    the defaults it leaves out resolve exactly as the original's `CLIPModel.from_pretrained` resolved them.
    """
    _check_supported(original)
    try:
        source = AutoConfig.for_model(**prompt_source)
        prompt = source.text_config.to_dict()
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ConversionError(
            f"The prompt encoder's config.json is not a CLIP/SigLIP model config ({type(error).__name__}: {error}); give "
            "the CLIP/SigLIP model the checkpoint's clip_weight names (--prompt-encoder)."
        ) from None
    siglip = prompt["model_type"] == "siglip_text_model"
    if bool(original.get("qwen", False)) != siglip:
        # The original picks its SigLIP projector when `qwen` is set and its CLIP projector otherwise.
        raise ConversionError(
            f"The checkpoint was built with the {'SigLIP' if original.get('qwen') else 'CLIP'} projector but the prompt "
            f"encoder config is a {prompt['model_type']}: give the CLIP/SigLIP model its `clip_weight` names."
        )
    # `extend_clip` (false when absent, as in the original) stretches the prompt positions into two tables; without it
    # the prompt encoder keeps CLIP's stock embeddings.
    extended = bool(original.get("extend_clip", False))
    if extended:
        prompt["max_position_embeddings"] = stretched_length(prompt["max_position_embeddings"])
    vision = {k: v for k, v in original["vision_config"].items() if k not in ("depth", "max_T")}
    if not siglip:
        # CLIPModel sizes both projections with the top-level `projection_dim`, not the sub-configs' own field.
        prompt["projection_dim"] = vision["projection_dim"] = source.projection_dim
    video_kernel = original.get("pooling_kernel")
    video_stride = original.get("pooling_stride")
    image_kernel = original.get("image_pooling_kernel") or video_kernel
    image_stride = original.get("image_pooling_stride") or video_stride
    output_size = original.get("pllava_pooling_shape") if video_kernel is None else None
    image_token_id = original["image_token_index"]
    # llava_onevision configs name a video placeholder; llava_next ones do not, and take the first row after the image
    # placeholder that the configs use for nothing else. A tokenizer, when there is one, has the last word: the
    # processor step moves the placeholder to the tokenizer's `<video>` (see `conversion.processor`).
    video_token_id = original.get("video_token_index") or _free_video_row(original, image_token_id)
    config = PPLLaVAConfig(
        vision_config=vision,
        text_config=original["text_config"],
        prompt_encoder_config=prompt,
        prompt_keep_positions=ORIGINAL_PROMPT_KEEP_POSITIONS,
        extended_prompt_positions=extended,
        # The original's SigLIP path runs its text tower with gradient, its CLIP path without.
        freeze_prompt_encoder=not siglip,
        video_pooling_kernel=video_kernel,
        video_pooling_stride=video_stride,
        video_pooling_output_size=output_size,
        image_pooling_kernel=image_kernel,
        image_pooling_stride=image_stride,
        pooling_temperature=original.get("pooling_temp", 0.01),
        use_btadapter=bool(original.get("btadapter", False)),
        btadapter_depth=original.get("btadapter_depth", 4),
        btadapter_max_frames=original.get("max_T", 64),
        vision_feature_layer=original.get("vision_feature_layer", -2),
        vision_feature_select_strategy=original.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=original.get("projector_hidden_act", "gelu"),
        image_grid_pinpoints=original.get("image_grid_pinpoints"),
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        ignore_index=original.get("ignore_index", -100),
        tie_word_embeddings=original.get("tie_word_embeddings", False),
        dtype=original.get("torch_dtype") or original.get("dtype"),
    )
    frame_shape = original.get("frame_shape")
    if frame_shape is not None and list(frame_shape) != list(config.patch_grid):
        raise ConversionError(
            f"frame_shape={frame_shape} disagrees with the vision tower's {config.patch_grid} patch grid."
        )

    return config


def expected_state(config: PPLLaVAConfig) -> dict[str, torch.Size]:
    """Every key our model loads, with its shape (built on the meta device, so nothing is allocated)."""
    with torch.device("meta"):
        model = PPLLaVAForConditionalGeneration(config)
    state = {key: tensor.shape for key, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@dataclass
class ShardPlan:
    """Original weight files of a checkpoint folder, in order."""

    files: list[str]

    @classmethod
    def from_folder(cls, folder: str, allow_pickle: bool = False) -> "ShardPlan":
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map; restore the file (download it again).")
            files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
            missing = [path for path in files if not os.path.isfile(path)]
            if missing:
                raise ConversionError(f"{index} lists weight files that are missing: {', '.join(missing)}.")
            return cls(files)
        safetensors_files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
        if safetensors_files:
            return cls([os.path.join(folder, name) for name in safetensors_files])
        pickle_files = sorted(name for name in os.listdir(folder) if name.endswith(".bin"))
        if pickle_files and not allow_pickle:
            raise ConversionError(
                f"{folder} holds only pickle weights ({', '.join(pickle_files)}). Pickle files can run code when loaded; "
                "convert them only if you trust their source, with allow_pickle=True (--allow-pickle), which loads them "
                "with torch.load(weights_only=True)."
            )
        if not pickle_files:
            raise ConversionError(f"No weights (*.safetensors or *.bin) in {folder}.")
        return cls([os.path.join(folder, name) for name in pickle_files])


def original_shapes(path: str) -> dict[str, torch.Size]:
    """Key -> shape of one weight file, read without loading the tensors (safetensors header, or a memory-mapped pickle)."""
    with _reading(path):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt", device="cpu") as handle:
                return {key: torch.Size(handle.get_slice(key).get_shape()) for key in handle.keys()}
        return {key: tensor.shape for key, tensor in _load_pickle(path).items()}


def iter_original_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one weight file, one at a time."""
    with _reading(path):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        else:
            yield from _load_pickle(path).items()


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Read failures of a weight file (truncated, corrupt, unreadable) as a `ConversionError` naming it."""
    try:
        yield
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ConversionError(
            f"Cannot read the weight file {path} ({error}); it may be truncated or corrupt: download it again."
        ) from error


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    # Only reached once the caller allowed pickle files; `weights_only` still refuses anything but tensors.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def converted_shape(key: str, shape: torch.Size) -> torch.Size:
    """Shape `convert_tensor` gives an original tensor of `shape`, computed on the meta device (nothing allocated)."""
    return convert_tensor(key, torch.empty(shape, device="meta")).shape


@dataclass
class WeightPlan:
    """Checked weights of an original checkpoint: its weight files, the output shard each becomes, and their size in
    bytes."""

    files: list[str]
    names: list[str]
    num_bytes: int


def plan_weights(input_folder: str, config: PPLLaVAConfig, allow_pickle: bool = False) -> WeightPlan:
    """Check every key and shape of the original weights from the files' headers, reading no tensor. Raises
    `ConversionError` listing every unknown, missing or mis-shaped key (and naming any unreadable file)."""
    expected = expected_state(config)
    plan = ShardPlan.from_folder(input_folder, allow_pickle=allow_pickle)
    seen: dict[str, torch.Size] = {}
    unknown = []
    for path in plan.files:
        for key, shape in original_shapes(path).items():
            try:
                ours = convert_key(key)
            except ConversionError:
                unknown.append(key)
                continue
            if ours is not None:
                seen[ours] = converted_shape(key, shape)
    _check_keys(seen, expected, unknown)
    return WeightPlan(plan.files, _output_names(len(plan.files)), sum(os.path.getsize(path) for path in plan.files))


def non_finite_weights(named_tensors) -> list[str]:
    """`"name (k of n values)"` for each floating-point tensor of `(name, tensor)` pairs holding NaN or inf: weights a
    model would load without a word, then answer with non-finite logits. A finite sum (a reduction, no copy of the
    tensor: a conversion's memory stays near one shard) clears a tensor; only one whose sum is not finite (NaN or inf
    inside, or a sum too large for its dtype) has its values counted."""
    found = []
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())):
            bad = int(torch.isfinite(tensor).logical_not_().sum())
            if bad:
                found.append(f"{name} ({bad} of {tensor.numel()} values)")
    return found


def write_weights(plan: WeightPlan, output_folder: str, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Convert the planned weights shard by shard into safetensors shards of our layout: one input shard at a time is
    read (memory-mapped), converted and written, so memory holds about one shard, never the whole model. Floating-point
    tensors are cast to `dtype` when given. Returns the weight map (our key -> output file name); a file that cannot
    be read or written raises `ConversionError` naming it."""
    os.makedirs(output_folder, exist_ok=True)
    weight_map = {}
    for path, name in zip(plan.files, plan.names):
        converted = {}
        for key, tensor in iter_original_tensors(path):
            ours = convert_key(key)
            if ours is None:
                continue
            tensor = convert_tensor(key, tensor)
            tensor = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
            for problem in non_finite_weights([(key, tensor)]):
                cast = f" once cast to {dtype}" if dtype is not None else ""
                raise ConversionError(
                    f"The weight {problem} in {path} is NaN or infinite{cast}: the checkpoint is damaged (download it "
                    "again)" + (f", or {dtype} cannot hold it (choose another --dtype)." if cast else ".")
                )
            converted[ours] = tensor
        target = os.path.join(output_folder, name)
        try:
            save_file(converted, target, metadata={"format": "pt"})
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"Writing the weight file {name} failed ({error}).") from error
        weight_map.update(dict.fromkeys(converted, name))
        del converted
    if len(plan.names) > 1:
        total = sum(os.path.getsize(os.path.join(output_folder, name)) for name in plan.names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(output_folder, "model.safetensors.index.json"), "w") as handle:
            json.dump(index, handle, indent=2)
    return weight_map


def convert_weights(
    input_folder: str,
    output_folder: str,
    config: PPLLaVAConfig,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> dict[str, str]:
    """`plan_weights` then `write_weights`: every key and shape is checked before anything is written."""
    return write_weights(plan_weights(input_folder, config, allow_pickle), output_folder, dtype)


def _output_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def state_problems(
    shapes: dict[str, torch.Size], expected: dict[str, torch.Size], source: str, fresh_prefixes: tuple[str, ...] = ()
) -> list[str]:
    """What keeps weights from `source` (key -> shape, in our key names) from filling a model of `expected` state: keys
    it leaves empty (unless they start with one of `fresh_prefixes`, initialised on purpose), keys the model does not
    have, and shape mismatches. Each entry names every key concerned."""
    report = {
        f"keys of the PPLLaVA-HF model no {source} fills": [
            key for key in expected if key not in shapes and not key.startswith(fresh_prefixes)
        ],
        f"{source} keys the PPLLaVA-HF model does not have": [key for key in shapes if key not in expected],
        f"shape mismatches ({source} vs PPLLaVA-HF)": [
            f"{key} {tuple(shape)} vs {tuple(expected[key])}"
            for key, shape in shapes.items()
            if key in expected and tuple(shape) != tuple(expected[key])
        ],
    }
    return [f"{what}: {', '.join(sorted(keys))}" for what, keys in report.items() if keys]


def _check_keys(seen: dict[str, torch.Size], expected: dict[str, torch.Size], unknown: list[str]) -> None:
    problems = ["original keys no rule knows: " + ", ".join(sorted(unknown))] if unknown else []
    problems += state_problems(seen, expected, "converted original key")
    if problems:
        raise ConversionError("The checkpoint does not convert:\n- " + "\n- ".join(problems))
