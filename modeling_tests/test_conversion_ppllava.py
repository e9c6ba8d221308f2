"""Conversion of original PPLLaVA checkpoints: parity with the original code, every layout, strictness, pickle handling
and memory."""

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from original_format import FIXTURE, qwen_layout, vicuna_layout, write_original_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.conversion.convert import convert_checkpoint
from ppllava_hf.conversion.rules import ConversionError, convert_config, expected_state
from ppllava_hf.conversion.verification import (
    FEATURE_TOLERANCE,
    LOGITS_TOLERANCE,
    inputs_for_case,
    load_reference_cases,
    verify_against_reference,
    verify_cases,
)


CHECKPOINT = FIXTURE / "checkpoint"
CASES = ("video", "image", "batch")
# Cases the original code computed on the same checkpoint: multi-image samples and odd-aspect anyres images.
MULTI_IMAGE_FIXTURE = FIXTURE.parent / "original_tiny_vicuna_multiimage"
MULTI_IMAGE_CASES = ("multi_image_3", "multi_image_2_batch", "image_odd_aspect")


def _converted_keys(folder: Path) -> dict[str, tuple]:
    shapes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def _copy_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "original"
    shutil.copytree(CHECKPOINT, folder)
    return folder


@pytest.fixture(scope="module")
def converted_fixture(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted") / "ppllava-tiny"
    convert_checkpoint(str(CHECKPOINT), str(output))
    return output


@pytest.fixture(scope="module")
def fixture_model(converted_fixture) -> PPLLaVAForConditionalGeneration:
    return PPLLaVAForConditionalGeneration.from_pretrained(converted_fixture, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def parity(fixture_model) -> dict[str, float]:
    """Max abs difference to the original's recorded output, per `case.tensor` (number of differing tokens for ids)."""
    return {check.name: check.difference for check in verify_against_reference(fixture_model, str(FIXTURE)).checks}


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the original code on the shared fixture


def test_the_test_helpers_describe_the_original_format_exactly():
    """The synthetic checkpoints of the other layouts are built by the same helpers, checked here against the keys the
    original code saved."""
    recorded = {}
    for line in (FIXTURE / "KEYS.txt").read_text().splitlines():
        key, shape, _ = line.split("\t")
        recorded[key] = tuple(json.loads(shape))
    assert vicuna_layout().shapes == recorded


def test_every_recorded_tensor_is_compared(parity):
    recorded = {name for case in load_reference_cases(str(FIXTURE)) for name in (f"{case.name}.{key}" for key in case.outputs)}
    # Attention masks select the compared positions; position ids are derived from them.
    not_compared = {name for name in recorded if name.split(".")[1] in ("merged_attention_mask", "merged_position_ids")}
    assert set(parity) == recorded - not_compared


@pytest.mark.parametrize("case", CASES)
def test_logits_match_the_original_on_attended_positions(parity, case):
    assert parity[f"{case}.logits"] <= 1e-4


@pytest.mark.parametrize("name", ["video.visual_features.0", "image.visual_features.0", "batch.visual_features.0", "batch.visual_features.1"])
def test_pooled_visual_tokens_match_the_original(parity, name):
    assert parity[name] <= 1e-5


@pytest.mark.parametrize(
    "name",
    [
        "video.vision_selected_features.0",
        "image.vision_selected_features.0",
        "video.clip_text_embeds.0",
        "image.clip_text_embeds.0",
        "video.retrieve_logits.0",
        *(f"{case}.merged_inputs_embeds" for case in CASES),
    ],
)
def test_intermediate_tensors_match_the_original(parity, name):
    assert parity[name] <= 1e-5


def test_greedy_generation_matches_the_original(fixture_model):
    case = next(case for case in load_reference_cases(str(FIXTURE)) if case.name == "video")
    inputs = inputs_for_case(fixture_model, case).model_inputs
    generated = fixture_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == [503, 209, 925, 503, 209]


def test_the_placeholder_stays_valid_for_the_original_vocabulary(fixture_model):
    config = fixture_model.config
    assert config.image_token_id == 1000  # the original's image_token_index
    assert config.video_token_id == 1001  # a free row of the padded 1064-token vocabulary
    assert config.video_token_id < config.text_config.vocab_size


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the original code on multi-image samples and odd-aspect images


def _multi_image_cases() -> dict:
    """The multi-image fixture's cases, `multi_image_3` compared with the outputs the original gives when its tower sees
    the 3 images in order: with exactly 3 images the original reads them channel-first (its `x.shape[1] == 3` test), a
    bug we do not reproduce. Its swapped retrieval logits and greedy tokens have no unswapped counterpart recorded."""
    cases = {case.name: case for case in load_reference_cases(str(MULTI_IMAGE_FIXTURE))}
    tensors = load_file(MULTI_IMAGE_FIXTURE / "cases.safetensors")
    case = cases["multi_image_3"]
    visual = tensors["multi_image_3.visual_features_unswapped.0"]
    placeholder = json.loads((MULTI_IMAGE_FIXTURE / "cases.json").read_text())["resolved_config"]["image_token_index"]
    placeholders = case.inputs["input_ids"][0] == placeholder
    visual_positions = placeholders.repeat_interleave(torch.where(placeholders, visual.shape[1], 1))
    merged = case.outputs["merged_inputs_embeds"].clone()
    merged[0, visual_positions] = visual.flatten(0, 1)
    case.outputs.update(
        logits=tensors["multi_image_3.logits_unswapped"],
        merged_inputs_embeds=merged,
        **{"visual_features.0": visual, "vision_selected_features.0": tensors["multi_image_3.vision_selected_features_unswapped.0"]},
    )
    for swapped in ("retrieve_logits.0", "generated_ids"):
        del case.outputs[swapped]
    return cases


# Masks and position ids select the compared positions; the processor's pixels are checked by the processor tests.
NOT_COMPARED = ("merged_attention_mask", "merged_position_ids", "processor_pixel_values")
MULTI_IMAGE_COMPARED = sorted(
    f"{case.name}.{key}" for case in _multi_image_cases().values() for key in case.outputs
    if key.split(".")[0] not in NOT_COMPARED
)


@pytest.fixture(scope="module")
def multi_image_parity(fixture_model) -> dict[str, float]:
    return {check.name: check.difference for check in verify_cases(fixture_model, list(_multi_image_cases().values())).checks}


def test_every_recorded_tensor_of_the_multi_image_cases_is_compared(multi_image_parity):
    assert sorted(multi_image_parity) == MULTI_IMAGE_COMPARED


@pytest.mark.parametrize("name", MULTI_IMAGE_COMPARED)
def test_multi_image_and_odd_aspect_outputs_match_the_original(multi_image_parity, name):
    assert multi_image_parity[name] <= (LOGITS_TOLERANCE if name.endswith(".logits") else FEATURE_TOLERANCE)


def test_visual_token_counts_are_the_originals(fixture_model):
    description = json.loads((MULTI_IMAGE_FIXTURE / "cases.json").read_text())
    backbone = fixture_model.model
    for case in description["cases"]:
        if case["name"] == "image_odd_aspect":
            ours = [backbone.num_image_tokens(tuple(image["image_size_hw"])) for image in case["unpad"]]
        else:
            ours = [count * backbone.num_multi_image_tokens() for count in case["num_images"]]
        assert ours == case["visual_tokens_per_sample"], case["name"]


def test_given_the_tower_input_the_original_built_every_recorded_output_of_three_images_matches(fixture_model):
    """Fed the channel-first frames the original's tower actually saw for 3 images, the model reproduces all of the
    original's outputs, greedy tokens included: the 3-image difference is exactly the original's axis mix-up."""
    case = next(case for case in load_reference_cases(str(MULTI_IMAGE_FIXTURE)) if case.name == "multi_image_3")
    case.pixel_values = [case.pixel_values[0].permute(2, 1, 0, 3, 4)]  # frame i = channel i of the 3 images
    report = verify_cases(fixture_model, [case])
    assert report.passed, str(report)
    assert "multi_image_3.generated_ids" in {check.name for check in report.checks}


def test_the_first_greedy_token_of_three_images_is_the_unswapped_originals(fixture_model):
    case = _multi_image_cases()["multi_image_3"]
    inputs = inputs_for_case(fixture_model, case).model_inputs
    generated = fixture_model.generate(**inputs, max_new_tokens=1, do_sample=False)
    last = int(case.outputs["merged_attention_mask"][0].sum()) - 1
    assert generated[0, -1] == case.outputs["logits"][0, last].argmax()


# ---------------------------------------------------------------------------------------------------------------------
# What a conversion writes


def test_fixture_without_tokenizer_converts_with_a_warning_and_no_processor(tmp_path, caplog):
    output = tmp_path / "converted"
    with caplog.at_level(logging.WARNING):
        result = convert_checkpoint(str(CHECKPOINT), str(output))
    assert not result.processor_saved
    assert "No processor is written" in caplog.text
    assert sorted(os.listdir(output)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]


def test_weights_are_written_in_our_key_layout(converted_fixture, fixture_model):
    expected = {key: tuple(shape) for key, shape in expected_state(fixture_model.config).items()}
    assert _converted_keys(converted_fixture) == expected
    with safe_open(converted_fixture / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_config_and_generation_config(converted_fixture):
    config = json.loads((converted_fixture / "config.json").read_text())
    assert config["model_type"] == "ppllava"
    assert config["dtype"] == "float32"
    assert config["prompt_encoder_config"]["max_position_embeddings"] == 248  # CLIP's 77, stretched
    generation = json.loads((converted_fixture / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_dtype_casts_floating_weights_and_the_config(tmp_path):
    output = tmp_path / "bf16"
    convert_checkpoint(str(CHECKPOINT), str(output), dtype=torch.bfloat16)
    assert {tensor.dtype for tensor in load_file(output / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_output_folder_with_files_is_refused(tmp_path):
    (tmp_path / "stale.safetensors").write_bytes(b"")
    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(str(CHECKPOINT), str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# The other layouts, built in the original format


LAYOUTS = {
    "vicuna_btadapter_3_shards": (vicuna_layout, 3),
    "vicuna_without_btadapter": (lambda: vicuna_layout(btadapter_depth=None), 1),
    "qwen_siglip_2_shards": (qwen_layout, 2),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_converts_and_runs(tmp_path, name):
    build, num_shards = LAYOUTS[name]
    write_original_checkpoint(tmp_path / "original", build(), num_shards=num_shards)
    result = convert_checkpoint(str(tmp_path / "original"), str(tmp_path / "converted"), verify=True)
    assert result.verification.passed, str(result.verification)
    assert len(set(result.weight_map.values())) == num_shards
    if num_shards > 1:
        index = json.loads((tmp_path / "converted" / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == result.weight_map


@pytest.fixture(scope="module")
def without_extend_clip(tmp_path_factory):
    """An original checkpoint saved with `extend_clip: false` (CLIP's stock text tower), its weights and conversion."""
    root = tmp_path_factory.mktemp("without_extend_clip")
    original = write_original_checkpoint(root / "original", vicuna_layout(extend_clip=False))
    result = convert_checkpoint(str(root / "original"), str(root / "converted"), verify=True)
    model = PPLLaVAForConditionalGeneration.from_pretrained(root / "converted", dtype=torch.float32).eval()
    return original, result, model


def test_a_checkpoint_without_extend_clip_converts_and_runs_with_clips_stock_77_positions(without_extend_clip):
    original, result, model = without_extend_clip
    assert result.verification.passed, str(result.verification)
    assert not result.config.extended_prompt_positions
    assert result.config.prompt_encoder_config.max_position_embeddings == 77
    table = model.model.prompt_alignment.text_model.embeddings.position_embedding.weight
    assert torch.equal(table, original["multi_modal_projector.clip_text_model.embeddings.position_embedding.weight"])


def test_without_extend_clip_the_prompt_encoder_computes_what_a_stock_clip_text_model_computes(without_extend_clip):
    original, _, model = without_extend_clip
    prefix = "multi_modal_projector.clip_text_model."
    stock = CLIPTextModel(model.config.prompt_encoder_config).eval()
    missing, unexpected = stock.load_state_dict(
        {key[len(prefix):]: value for key, value in original.items() if key.startswith(prefix)}, strict=False
    )
    assert (missing, unexpected) == ([], [])
    projection = original["multi_modal_projector.clip_text_projection.weight"]
    ids = torch.tensor([[510, 17, 250, 33, 511] + [511] * 72, [510, 40, 41, 511] + [511] * 73])
    mask = (torch.arange(77) < torch.tensor([[5], [4]])).long()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).pooler_output @ projection.T
        ours = model.model.get_prompt_embeds(ids, mask)
    assert torch.equal(ours, expected)


def test_qwen_layout_takes_the_siglip_head_value_rows_and_the_onevision_video_token(tmp_path):
    original = write_original_checkpoint(tmp_path / "original", qwen_layout())
    result = convert_checkpoint(str(tmp_path / "original"), str(tmp_path / "converted"))
    converted = load_file(tmp_path / "converted" / "model.safetensors")
    in_proj = original["multi_modal_projector.clip_visual_head.attention.in_proj_weight"]
    value_proj = converted["model.prompt_alignment.visual_projection.value_proj.weight"]
    assert torch.equal(value_proj, in_proj[2 * in_proj.shape[1] :])
    # The probe, the query/key rows and the output projection serve only the pooled probe output, which PPLLaVA never reads.
    head_parts = {key.split("visual_projection.")[1].split(".")[0] for key in converted if "visual_projection." in key}
    assert head_parts == {"value_proj", "layernorm", "mlp"}
    assert converted["model.prompt_alignment.text_model.embeddings.position_embedding_base"].shape[0] == 196
    config = result.config
    assert (config.image_token_id, config.video_token_id) == (1000, 1002)  # onevision names its video placeholder
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert not config.freeze_prompt_encoder and not config.use_btadapter


def test_multi_image_checkpoint_runs_two_images_in_one_prompt(tmp_path):
    """`ppllava_vicuna7b_image_video_multiimage` has the image+video layout; here two anyres images share one prompt."""
    write_original_checkpoint(tmp_path / "ppllava_multiimage", vicuna_layout(), num_shards=2)
    convert_checkpoint(str(tmp_path / "ppllava_multiimage"), str(tmp_path / "converted"))
    model = PPLLaVAForConditionalGeneration.from_pretrained(tmp_path / "converted", dtype=torch.float32).eval()
    sizes = [(84, 168), (168, 168)]
    counts = [model.model.num_image_tokens(size) for size in sizes]
    input_ids = torch.tensor([[5, 6] + [1000] * counts[0] + [7] + [1000] * counts[1] + [8, 9]])
    pixel_values = [torch.randn(3, 3, 84, 84), torch.randn(5, 3, 84, 84)]
    clip_input_ids = torch.tensor([[510, 20, 21, 511]])
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=torch.tensor(sizes), clip_input_ids=clip_input_ids)
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits.shape == (1, input_ids.shape[1], 1064)
    assert output.image_hidden_states.shape[0] == sum(counts)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape == (1, input_ids.shape[1] + 3)


# ---------------------------------------------------------------------------------------------------------------------
# Strictness


def _edit(state: dict[str, torch.Tensor], edit: str) -> str:
    """Apply one defect to an original state dict; returns the key the error must name."""
    if edit == "renamed":
        state["language_model.model.final_norm.weight"] = state.pop("language_model.model.norm.weight")
        return "model.language_model.final_norm.weight"
    if edit == "missing":
        del state["multi_modal_projector.clip_visual_ln.bias"]
        return "model.prompt_alignment.visual_layernorm.bias"
    if edit == "extra":
        state["multi_modal_projector.clip_logit_offset"] = torch.zeros(())
        return "multi_modal_projector.clip_logit_offset"
    state["image_newline"] = torch.zeros(65)
    return "model.image_newline (65,) vs (64,)"


@pytest.mark.parametrize("edit", ["renamed", "missing", "extra", "wrong_shape"])
def test_a_defective_checkpoint_fails_naming_the_key_and_writes_nothing(tmp_path, edit):
    folder = _copy_checkpoint(tmp_path)
    state = load_file(folder / "model.safetensors")
    named = _edit(state, edit)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ConversionError, match=r"does not convert") as error:
        convert_checkpoint(str(folder), str(tmp_path / "converted"))
    assert named in str(error.value)
    assert not (tmp_path / "converted").exists() or not os.listdir(tmp_path / "converted")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pooling": "pllava"}, "prompt-guided pooling"),
        ({"qwen": True, "extend_clip": False}, "extend_clip: false"),
        ({"valuew_plus": True}, "valuew_plus"),
        ({"qwen": True}, "SigLIP projector"),
        ({"frame_shape": [24, 24]}, "frame_shape"),
    ],
)
def test_original_settings_that_cannot_be_reproduced_are_refused(change, message):
    original = json.loads((CHECKPOINT / "config.json").read_text())
    prompt_source = json.loads((CHECKPOINT / "clip" / "config.json").read_text())
    with pytest.raises(ConversionError, match=message):
        convert_config({**original, **change}, prompt_source)


def test_prompt_encoder_sizes_resolve_as_transformers_resolves_the_clip_config():
    """Old CLIP configs carry the real text sizes in `text_config_dict` and size both projections by the top level."""
    original = json.loads((CHECKPOINT / "config.json").read_text())
    prompt_source = json.loads((CHECKPOINT / "clip" / "config.json").read_text())
    real_text = prompt_source.pop("text_config")
    prompt_source["text_config"] = {"hidden_size": 512, "projection_dim": 512}  # stale defaults, overridden below
    prompt_source["text_config_dict"] = real_text
    config = convert_config(original, prompt_source)
    assert config.prompt_encoder_config.hidden_size == 48
    assert config.prompt_encoder_config.projection_dim == config.vision_config.projection_dim == 40


# ---------------------------------------------------------------------------------------------------------------------
# Pickle weights


def _pickle_checkpoint(tmp_path: Path, state: dict) -> Path:
    folder = _copy_checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_without_the_flag(tmp_path):
    folder = _pickle_checkpoint(tmp_path, load_file(CHECKPOINT / "model.safetensors"))
    with pytest.raises(ConversionError, match="allow-pickle"):
        convert_checkpoint(str(folder), str(tmp_path / "converted"))


def test_pickle_weights_convert_to_the_same_safetensors_with_the_flag(tmp_path, converted_fixture):
    folder = _pickle_checkpoint(tmp_path, load_file(CHECKPOINT / "model.safetensors"))
    convert_checkpoint(str(folder), str(tmp_path / "converted"), allow_pickle=True)
    assert sorted(path.name for path in (tmp_path / "converted").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "converted").glob("*.bin"))
    from_pickle = load_file(tmp_path / "converted" / "model.safetensors")
    from_safetensors = load_file(converted_fixture / "model.safetensors")
    assert from_pickle.keys() == from_safetensors.keys()
    assert all(torch.equal(from_pickle[key], from_safetensors[key]) for key in from_pickle)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_allowed_pickle_files_still_load_only_tensors(tmp_path):
    marker = tmp_path / "code-ran"
    folder = _pickle_checkpoint(tmp_path, {"image_newline": _RunsCodeWhenUnpickled(marker)})
    with pytest.raises(pickle.UnpicklingError):
        convert_checkpoint(str(folder), str(tmp_path / "converted"), allow_pickle=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Memory


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from ppllava_hf.conversion.rules import (
        ShardPlan, convert_config, convert_key, convert_tensor, convert_weights, iter_original_tensors,
    )
    from original_format import vicuna_layout

    def status(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))

    def peak_increase(function):
        # Peak resident memory above the current level: reset the high-water mark (VmHWM), run, read it back.
        baseline = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        function()
        return status("VmHWM") - baseline

    def load_everything_then_write():
        state = {}
        for path in ShardPlan.from_folder(original).files:
            state.update({convert_key(key): convert_tensor(key, tensor) for key, tensor in iter_original_tensors(path) if convert_key(key)})
        save_file(state, os.path.join(root, "all-at-once.safetensors"))

    root, original = sys.argv[1], sys.argv[2]
    config = convert_config(*json.loads(sys.argv[3]))
    print(json.dumps({
        "streaming": peak_increase(lambda: convert_weights(original, os.path.join(root, "converted"), config)),
        "all_at_once": peak_increase(load_everything_then_write),
    }))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_conversion_peak_memory_stays_near_one_shard(tmp_path):
    """A ~160 MB checkpoint in 8 shards: converting it raises peak RSS by about one shard, while loading every shard
    first (the control, which shows the measurement sees whole-checkpoint loads) raises it by the whole checkpoint."""
    layout = vicuna_layout(btadapter_depth=None, vocab=8192, hidden=512, intermediate=2048, layers=8)
    write_original_checkpoint(tmp_path / "original", layout, num_shards=8)
    shards = [path.stat().st_size for path in (tmp_path / "original").glob("*.safetensors")]
    assert len(shards) == 8
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    arguments = [str(tmp_path), str(tmp_path / "original"), json.dumps([layout.config, layout.prompt_config])]
    probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *arguments], env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    peaks = json.loads(probe.stdout.splitlines()[-1])
    print(f"largest shard {max(shards) / 2**20:.1f} MiB, checkpoint {sum(shards) / 2**20:.1f} MiB, peak increase: "
          f"streaming {peaks['streaming'] / 2**20:.1f} MiB, all at once {peaks['all_at_once'] / 2**20:.1f} MiB")
    assert peaks["streaming"] <= 2 * max(shards)
    assert peaks["all_at_once"] >= 0.9 * sum(shards)
