"""Checks that a converted checkpoint computes what it should.

With reference outputs recorded by the original code (the format of the tiny fixture: `cases.json` + `cases.safetensors`)
each recorded case is run through the converted model and every recorded tensor is compared. Without them the model is
checked against itself: greedy generation with and without the KV cache, and a padded batch against each sample alone.
Both expect a float32 model; the tolerances are float32 ones.
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration
from ..models.ppllava.token_counts_ppllava import num_anyres_tiles


LOGITS_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-5


class VerificationError(Exception):
    """A converted checkpoint does not reproduce its reference outputs or is inconsistent with itself."""


@dataclass(frozen=True)
class Check:
    """One comparison: the largest absolute difference (or number of differing tokens) and what is tolerated."""

    name: str
    difference: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.difference <= self.tolerance


@dataclass
class VerificationReport:
    checks: list[Check] = field(default_factory=list)

    def compare(self, name: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
        """Record the max absolute difference of two tensors (infinite when their shapes differ)."""
        if ours.shape != reference.shape:
            difference = math.inf
        elif ours.is_floating_point():
            difference = (ours.float() - reference.float()).abs().max().item() if ours.numel() else 0.0
        else:
            difference = float((ours != reference).sum())
        self.checks.append(Check(name, difference, tolerance))

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def raise_for_failures(self) -> None:
        if not self.passed:
            raise VerificationError(f"The converted checkpoint failed verification:\n{self}")

    def __str__(self) -> str:
        return "\n".join(
            f"{'ok  ' if check.passed else 'FAIL'} {check.name}: {check.difference:.3g} (tolerance {check.tolerance:g})"
            for check in self.checks
        )


# ---------------------------------------------------------------------------------------------------------------------
# Reference outputs of the original code


@dataclass
class ReferenceCase:
    """One forward call recorded with the original code: its inputs (in the original's format) and its outputs, keyed
    without the case prefix (`logits`, `visual_features.0`, ...)."""

    name: str
    media_types: list[str]
    inputs: dict[str, torch.Tensor]
    pixel_values: list[torch.Tensor]
    outputs: dict[str, torch.Tensor]


def load_reference_cases(folder: str) -> list[ReferenceCase]:
    """The cases of a reference folder (`cases.json` lists them, `cases.safetensors` holds the tensors)."""
    with open(os.path.join(folder, "cases.json")) as handle:
        description = json.load(handle)
    tensors = load_file(os.path.join(folder, "cases.safetensors"))
    cases = []
    for case in description["cases"]:
        prefix = f"{case['name']}."
        inputs = {key: tensors[case[key]] for key in ("input_ids", "attention_mask", "image_sizes", "clip_ids", "clip_mask")}
        outputs = {name[len(prefix) :]: tensors[name] for name in case["reference_outputs"]}
        # Pixel values are stored in float16 to keep the fixture small; the original ran them in float32.
        pixel_values = [tensors[name].float() for name in case["pixel_values"]]
        cases.append(ReferenceCase(case["name"], case["media_types"], inputs, pixel_values, outputs))
    return cases


# How the original's media types reach our model: the input holding the pixels, and the `encode_multimodal` entry
# holding the tokens (anyres images and multi-image groups share the image placeholders, in placeholder order).
_MEDIA_INPUTS = {"video": "pixel_values_videos", "image": "pixel_values", "multi-image": "pixel_values_multi_image"}
_MEDIA_OUTPUTS = {"video": "video", "image": "image", "multi-image": "image"}


@dataclass
class CaseInputs:
    """Our model inputs for a reference case, and for each sample its visual item: `(media type, index in the model
    input, index in the encoded output)`."""

    model_inputs: dict
    visual_items: list[tuple[str, int, int]]

    def pixels(self, sample: int) -> torch.Tensor:
        """The frames `(frames, 3, H, W)`, anyres tiles `(tiles, 3, H, W)` or multi-image images `(images, 3, H, W)` of
        one sample."""
        media_type, index, _ = self.visual_items[sample]
        return self.model_inputs[_MEDIA_INPUTS[media_type]][index]

    def tokens(self, encoded: dict, sample: int) -> torch.Tensor:
        """The visual tokens of one sample in `encode_multimodal`'s output."""
        media_type, _, index = self.visual_items[sample]
        return encoded[_MEDIA_OUTPUTS[media_type]].pooler_output[index]


def inputs_for_case(model: PPLLaVAForConditionalGeneration, case: ReferenceCase) -> CaseInputs:
    """Our inputs for an original forward call: each placeholder of a sample becomes as many image/video tokens as the
    model produces, `pixel_values` is split into videos `(frames, 3, H, W)`, anyres images `(tiles, 3, H, W)` and
    multi-image groups `(images, 3, H, W)`, and the guidance ids become `clip_input_ids`. Samples are re-padded on the
    right."""
    config, backbone = model.config, model.model
    placeholder = config.image_token_id  # the original's only placeholder, `image_token_index`
    rows, items, image_sizes = [], [], []
    media = {media_type: [] for media_type in _MEDIA_INPUTS}
    outputs = {"video": 0, "image": 0}
    for sample, media_type in enumerate(case.media_types):
        pixels = case.pixel_values[sample]
        num_placeholders = 1
        if media_type == "video":
            pixels = pixels[:, 0]  # (frames, 1, 3, H, W): one tile per frame
            token, count = config.video_token_id, backbone.video_pooling_plan(pixels.shape[0]).num_tokens
        elif media_type == "image":
            pixels = pixels[0]  # (1, tiles, 3, H, W)
            image_sizes.append(tuple(int(v) for v in case.inputs["image_sizes"][sample]))
            token, count = config.image_token_id, backbone.num_image_tokens(image_sizes[-1])
        elif media_type == "multi-image":
            pixels = pixels[:, 0]  # (images, 1, 3, H, W): image k is frame k of one clip, one placeholder each
            token, count, num_placeholders = config.image_token_id, backbone.num_multi_image_tokens(), pixels.shape[0]
        else:
            raise ValueError(f"Reference case {case.name!r}: media type {media_type!r} is not supported.")
        output = _MEDIA_OUTPUTS[media_type]
        items.append((media_type, len(media[media_type]), outputs[output]))
        outputs[output] += 1
        media[media_type].append(pixels)
        attended = case.inputs["input_ids"][sample][case.inputs["attention_mask"][sample].bool()]
        rows.append(_expand_placeholders(attended, placeholder, token, count, num_placeholders))
    input_ids, attention_mask = _pad(rows, config.text_config.pad_token_id or 0, side="right")
    model_inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "clip_input_ids": case.inputs["clip_ids"],
        "clip_attention_mask": case.inputs["clip_mask"],
    }
    for media_type, pixels in media.items():
        if pixels:
            model_inputs[_MEDIA_INPUTS[media_type]] = pixels
    if image_sizes:
        model_inputs["image_sizes"] = torch.tensor(image_sizes)
    if media["multi-image"]:
        model_inputs["multi_image"] = torch.tensor([media_type == "multi-image" for media_type in case.media_types])
    return CaseInputs(model_inputs, items)


def _expand_placeholders(ids: torch.Tensor, placeholder: int, token: int, count: int, expected: int) -> torch.Tensor:
    """Each of the `expected` placeholders of `ids` replaced by `count` copies of `token`."""
    positions = (ids == placeholder).nonzero().flatten().tolist()
    if len(positions) != expected:
        raise ValueError(f"Expected {expected} placeholder(s) {placeholder} in the sample, found {len(positions)}.")
    pieces, start = [], 0
    for position in positions:
        pieces += [ids[start:position], torch.full((count,), token, dtype=ids.dtype)]
        start = position + 1
    return torch.cat([*pieces, ids[start:]])


def _pad(rows: list[torch.Tensor], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one length on `side`, and their attention mask."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        input_ids[index, span] = row
        attention_mask[index, span] = 1
    return input_ids, attention_mask


def verify_against_reference(model: PPLLaVAForConditionalGeneration, reference_folder: str) -> VerificationReport:
    """Run every case of `reference_folder` and compare each recorded tensor (see `verify_cases`)."""
    return verify_cases(model, load_reference_cases(reference_folder))


@torch.no_grad()
def verify_cases(model: PPLLaVAForConditionalGeneration, cases: list[ReferenceCase]) -> VerificationReport:
    """Run each case and compare each of its recorded outputs: logits and merged LM inputs on attended positions,
    pooled visual tokens, selected vision features, prompt embeddings, patch-prompt cosine similarities, and greedy
    tokens."""
    report = VerificationReport()
    backbone = model.model
    for case in cases:
        prepared = inputs_for_case(model, case)
        inputs = prepared.model_inputs
        visual = backbone.encode_multimodal(**{key: value for key, value in inputs.items() if key != "attention_mask"})
        output = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_encoder_outputs=visual,
            output_hidden_states=True,
        )
        ours_attended = inputs["attention_mask"].bool()
        theirs_attended = case.outputs["merged_attention_mask"].bool()
        report.compare(
            f"{case.name}.logits", output.logits[ours_attended], case.outputs["logits"][theirs_attended], LOGITS_TOLERANCE
        )
        report.compare(
            f"{case.name}.merged_inputs_embeds",
            output.hidden_states[0][ours_attended],
            case.outputs["merged_inputs_embeds"][theirs_attended],
            FEATURE_TOLERANCE,
        )
        for sample, (media_type, _, _) in enumerate(prepared.visual_items):
            pooled = prepared.tokens(visual, sample)
            ours = _sample_outputs(backbone, inputs, sample, media_type, prepared.pixels(sample), pooled)
            for name, tensor in ours.items():
                if f"{name}.{sample}" in case.outputs:
                    report.compare(f"{case.name}.{name}.{sample}", tensor, case.outputs[f"{name}.{sample}"], FEATURE_TOLERANCE)
        if (expected := case.outputs.get("generated_ids")) is not None:
            new_tokens = expected[:, case.inputs["input_ids"].shape[1] :]
            generated = model.generate(**inputs, max_new_tokens=new_tokens.shape[1], do_sample=False)
            report.compare(f"{case.name}.generated_ids", generated[:, inputs["input_ids"].shape[1] :], new_tokens, 0)
    return report


def _sample_outputs(backbone, inputs: dict, sample: int, media_type: str, pixels: torch.Tensor, pooled: torch.Tensor) -> dict:
    """Our counterparts of the original's per-sample intermediate tensors, under the names it recorded them (multi-image
    visual features as `(images, tokens per image, dim)`, the others as `(1, tokens, dim)`)."""
    prompt = backbone.get_prompt_embeds(
        inputs["clip_input_ids"][sample : sample + 1], inputs["clip_attention_mask"][sample : sample + 1]
    )
    clip_lengths = [1] * pixels.shape[0] if media_type == "image" else [pixels.shape[0]]
    features = backbone.encode_frames(pixels, clip_lengths).last_hidden_state
    patches = features.unflatten(1, backbone.config.patch_grid)[None]
    return {
        "visual_features": pooled.unflatten(0, (pixels.shape[0], -1)) if media_type == "multi-image" else pooled[None],
        "clip_text_embeds": prompt,
        "vision_selected_features": features,
        "retrieve_logits": backbone.prompt_alignment.cosine_similarity(patches, prompt),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Self-consistency


def self_consistency_samples(model: PPLLaVAForConditionalGeneration, seed: int = 0) -> list[dict]:
    """Two random samples, a video and an anyres image with prompts of different lengths, as single-sample inputs."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    tile = config.vision_config.image_size
    text_ids_end = min(config.image_token_id, config.video_token_id)
    prompt_vocab = config.prompt_encoder_config.vocab_size

    def ids(length: int, end: int) -> torch.Tensor:
        return torch.randint(3, end, (1, length), generator=generator)

    num_frames = 2 * config.video_pooling_kernel[0]
    image_size = (tile, 2 * tile)
    num_tiles = num_anyres_tiles(image_size, config.image_grid_pinpoints, tile)
    video = {"pixel_values_videos": torch.randn(1, num_frames, 3, tile, tile, generator=generator)}
    image = {
        "pixel_values": torch.randn(1, num_tiles, 3, tile, tile, generator=generator),
        "image_sizes": torch.tensor([image_size]),
    }
    visual = (
        (video, config.video_token_id, model.model.video_pooling_plan(num_frames).num_tokens, 3),
        (image, config.image_token_id, model.model.num_image_tokens(image_size), 7),
    )
    samples = []
    for pixels, token, count, text_length in visual:
        input_ids = torch.cat([ids(2, text_ids_end), torch.full((1, count), token), ids(text_length, text_ids_end)], dim=1)
        clip_input_ids = ids(12, prompt_vocab - 3)
        samples.append({
            **pixels,
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "clip_input_ids": clip_input_ids,
            "clip_attention_mask": torch.ones_like(clip_input_ids),
        })
    return samples


def _left_padded_batch(samples: list[dict], pad_id: int) -> dict:
    input_ids, attention_mask = _pad([sample["input_ids"][0] for sample in samples], pad_id, side="left")
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in ("clip_input_ids", "clip_attention_mask", "pixel_values_videos", "pixel_values", "image_sizes"):
        values = [sample[key] for sample in samples if key in sample]
        if values:
            batch[key] = torch.cat(values)
    return batch


@torch.no_grad()
def verify_self_consistency(model: PPLLaVAForConditionalGeneration, seed: int = 0, max_new_tokens: int = 6) -> VerificationReport:
    """Without reference outputs: a left-padded batch of a video and an image sample must give each sample's logits
    alone (attended positions), and greedy generation must give the same tokens with and without the KV cache."""
    report = VerificationReport()
    samples = self_consistency_samples(model, seed)
    batch = _left_padded_batch(samples, model.config.text_config.pad_token_id or 0)
    batch_logits = model(**batch).logits
    for index, sample in enumerate(samples):
        alone = model(**sample).logits[0]
        in_batch = batch_logits[index][batch["attention_mask"][index].bool()]
        report.compare(f"batch_vs_single.sample{index}.logits", in_batch, alone, LOGITS_TOLERANCE)
    generation = {"max_new_tokens": max_new_tokens, "do_sample": False}
    cached = model.generate(**batch, use_cache=True, **generation)
    uncached = model.generate(**batch, use_cache=False, **generation)
    report.compare("cached_vs_uncached.generated_ids", cached, uncached, 0)
    return report


def verify_converted(folder: str, reference_folder: str | None = None) -> VerificationReport:
    """Load a converted folder in float32 and verify it: against `reference_folder` when given, else against itself."""
    model = PPLLaVAForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    if reference_folder is not None:
        return verify_against_reference(model, reference_folder)
    return verify_self_consistency(model)
