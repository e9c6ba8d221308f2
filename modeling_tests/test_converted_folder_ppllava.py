"""A converted folder as users meet it: model card, remote code without ppllava_hf installed, the Hub, the processor
step, and the command line."""

import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from original_format import FIXTURE, vicuna_layout, write_original_checkpoint
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from tolerances import float32_forward
from transformers import AutoModelForImageTextToText, AutoProcessor, TokenizersBackend

from ppllava_hf.conversion import convert, original_checkpoint, remote_code
from ppllava_hf.conversion.convert import convert_checkpoint
from ppllava_hf.conversion.model_card import usage_snippet
from ppllava_hf.conversion.original_checkpoint import OriginalCheckpoint
from ppllava_hf.conversion.rules import ConversionError
from ppllava_hf.testing.tiny import tiny_prompt_tokenizer, tiny_tokenizer


CHECKPOINT = FIXTURE / "checkpoint"
PUBLISHED_FOLDER = "farewellthree/ppllava_weight/ppllava_vicuna7b_image_video"


def _python_block(markdown: str) -> str:
    return re.search(r"```python\n(.*?)```", markdown, flags=re.DOTALL).group(1)


def _load_cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoints", Path(__file__).parents[1] / "convert_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def remote_code_folder(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("remote") / "ppllava-tiny-remote"
    convert_checkpoint(str(CHECKPOINT), str(output), remote_code=True)
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Model card


def test_model_card_metadata(remote_code_folder):
    card = ModelCard.load(remote_code_folder / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "video-text-to-text"
    assert card.data.base_model == "farewellthree/ppllava_weight"
    assert {"ppllava", "video-text-to-text", "custom_code"} <= set(card.data.tags)


def test_model_card_says_where_it_comes_from_and_how_to_cite(remote_code_folder):
    text = ModelCard.load(remote_code_folder / "README.md").text
    assert "`checkpoint`" in text  # the original folder's name
    assert "https://arxiv.org/abs/2411.02327" in text
    assert "@article{liu2024ppllava," in text


def test_model_card_snippet_loads_the_right_classes(remote_code_folder):
    snippet = _python_block(ModelCard.load(remote_code_folder / "README.md").text)
    assert f'AutoModelForImageTextToText.from_pretrained("{remote_code_folder}"' in snippet
    assert "trust_remote_code=True" in snippet
    config = json.loads((remote_code_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_ppllava.PPLLaVAForConditionalGeneration"


def test_model_card_snippet_runs_with_the_package(tmp_path):
    output = tmp_path / "converted"
    convert_checkpoint(str(CHECKPOINT), str(output))
    snippet = _python_block(ModelCard.load(output / "README.md").text)
    assert "import ppllava_hf" in snippet and "trust_remote_code" not in snippet
    namespace = {}
    exec(snippet, namespace)
    assert namespace["output"].shape[1] == namespace["input_ids"].shape[1] + 5


def test_model_card_snippet_uses_the_processor_when_there_is_one():
    snippet = usage_snippet("user/ppllava", has_processor=True, remote_code=True)
    assert 'AutoProcessor.from_pretrained("user/ppllava", trust_remote_code=True)' in snippet
    assert "processor.apply_chat_template(" in snippet
    assert 'AutoModelForImageTextToText.from_pretrained("user/ppllava"' in snippet


# ---------------------------------------------------------------------------------------------------------------------
# Remote code


def test_remote_code_folder_carries_the_model_folder_and_auto_map(remote_code_folder):
    """The exported code is the model folder `ppllava_hf/models/ppllava/`, file for file and byte for byte."""
    payload = {path.name: path.read_bytes() for path in remote_code.PAYLOAD_FOLDER.glob("*.py")}
    assert {path.name: path.read_bytes() for path in remote_code_folder.glob("*.py")} == payload
    assert {"configuration_ppllava.py", "modeling_ppllava.py", "processing_ppllava.py"} <= set(payload)
    auto_map = json.loads((remote_code_folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_ppllava.PPLLaVAConfig",
        "AutoModel": "modeling_ppllava.PPLLaVAModel",
        "AutoModelForImageTextToText": "modeling_ppllava.PPLLaVAForConditionalGeneration",
        "AutoModelForMultimodalLM": "modeling_ppllava.PPLLaVAForConditionalGeneration",
    }


_WITHOUT_PPLLAVA = textwrap.dedent(
    """
    import sys

    class RefusePPLLaVA:
        # In case ppllava_hf is installed inside site-packages itself: the import machinery must not find it.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ppllava_hf":
                raise ModuleNotFoundError(f"No module named {{name!r}}")

    sys.path[:] = {paths!r}
    sys.meta_path.insert(0, RefusePPLLaVA())
    try:
        import ppllava_hf
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("ppllava_hf is importable in the isolated interpreter")
    sys.argv[1:] = {arguments!r}
    """
)

_LOAD_REMOTE_CODE = textwrap.dedent(
    """
    import json
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForImageTextToText

    folder, reference = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)

    # The fixture's video case: its one placeholder becomes the model's video tokens.
    cases = load_file(reference + "/cases.safetensors")
    ids = cases["video.input_ids"][0]
    at = int((ids == model.config.image_token_id).nonzero()[0, 0])
    count = model.model.video_pooling_plan(16).num_tokens
    input_ids = torch.cat([ids[:at], torch.full((count,), model.config.video_token_id), ids[at + 1 :]])[None]
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            pixel_values_videos=cases["video.pixel_values"].float()[:, 0][None],
            clip_input_ids=cases["video.clip_ids"],
            clip_attention_mask=cases["video.clip_mask"],
        ).logits
    print(json.dumps({
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "base_class": type(backbone).__name__,
        "max_logit_difference": (logits - cases["video.logits"]).abs().max().item(),
    }))
    """
)


def _run_without_ppllava(script: str, *arguments: str, home: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter that cannot import ppllava_hf: isolated mode without site initialisation (so
    no .pth file adds an editable install), a sys.path of the standard library and site-packages only, and an import
    hook refusing ppllava_hf; the script fails if `import ppllava_hf` still succeeds."""
    paths = [path for path in sys.path if path and not os.path.isdir(os.path.join(path, "ppllava_hf"))]
    paths += [path for path in site.getsitepackages() if path not in paths]
    prelude = _WITHOUT_PPLLAVA.format(paths=paths, arguments=list(arguments))
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + script], env=env, capture_output=True, text=True, cwd=home
    )


def test_remote_code_folder_loads_and_matches_the_original_without_ppllava_hf(remote_code_folder, tmp_path):
    run = _run_without_ppllava(_LOAD_REMOTE_CODE, str(remote_code_folder), str(FIXTURE), home=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["model_class"].startswith("transformers_modules.")
    assert result["model_class"].endswith("modeling_ppllava.PPLLaVAForConditionalGeneration")
    assert result["base_class"] == "PPLLaVAModel"
    assert result["max_logit_difference"] <= 1e-4


def test_remote_code_model_card_snippet_runs_without_ppllava_hf(remote_code_folder, tmp_path):
    snippet = _python_block(ModelCard.load(remote_code_folder / "README.md").text)
    run = _run_without_ppllava(snippet, home=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("tensor(")


def test_the_isolated_interpreter_really_lacks_ppllava_hf(tmp_path):
    run = _run_without_ppllava("import ppllava_hf", home=tmp_path)
    assert run.returncode != 0 and "No module named 'ppllava_hf'" in run.stderr


def test_the_model_folder_imports_nothing_outside_itself():
    remote_code.check_self_contained(remote_code.payload_files())


@pytest.mark.parametrize(
    "line, problem",
    [
        ("from ppllava_hf.models.ppllava.token_counts_ppllava import PoolingPlan", "imports ppllava_hf absolutely"),
        ("import ppllava_hf", "imports ppllava_hf absolutely"),
        ("from . import token_counts_ppllava", "is not a flat `from .module import ...`"),
        ("from ..conversion import rules", "is not a flat `from .module import ...`"),
        ("from .relevance import video_relevance", "imports .relevance, which is not in the folder"),
    ],
)
def test_remote_code_refuses_modules_that_would_not_load_without_the_package(tmp_path, line, problem):
    (tmp_path / "modeling_bad.py").write_text(f"{line}\n\n\nclass Bad:\n    pass\n")
    with pytest.raises(RuntimeError, match=re.escape(problem)):
        remote_code.check_self_contained([tmp_path / "modeling_bad.py"])


# ---------------------------------------------------------------------------------------------------------------------
# The Hub (never reached: huggingface_hub is replaced by recorders)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Hub downloads served from a local copy of the fixture placed where the published folder would be."""
    calls = []
    snapshot = tmp_path / "snapshot"
    shutil.copytree(CHECKPOINT, snapshot / "ppllava_vicuna7b_image_video")

    def snapshot_download(repo_id, allow_patterns):
        calls.append(("snapshot_download", repo_id, allow_patterns))
        return str(snapshot)

    def hf_hub_download(repo_id, filename):
        calls.append(("hf_hub_download", repo_id, filename))
        return str(CHECKPOINT / "clip" / filename)

    monkeypatch.setattr(original_checkpoint, "snapshot_download", snapshot_download)
    monkeypatch.setattr(original_checkpoint, "hf_hub_download", hf_hub_download)
    return calls


def test_a_published_folder_downloads_only_itself(fake_hub):
    checkpoint = OriginalCheckpoint.resolve(PUBLISHED_FOLDER)
    assert checkpoint.repo_id == "farewellthree/ppllava_weight"
    assert checkpoint.name == "ppllava_vicuna7b_image_video"
    (_, repo_id, patterns), = fake_hub
    assert repo_id == "farewellthree/ppllava_weight"
    assert all(pattern.startswith("ppllava_vicuna7b_image_video/") for pattern in patterns)
    assert "ppllava_vicuna7b_image_video/*.safetensors" in patterns
    assert not any(pattern.endswith(".bin") for pattern in patterns)
    OriginalCheckpoint.resolve(PUBLISHED_FOLDER, allow_pickle=True)
    assert "ppllava_vicuna7b_image_video/*.bin" in fake_hub[-1][2]


def test_a_published_folder_converts_and_its_card_names_it(fake_hub, tmp_path):
    output = tmp_path / "converted"
    convert_checkpoint(PUBLISHED_FOLDER, str(output), prompt_encoder="openai/clip-vit-large-patch14-336")
    assert ("hf_hub_download", "openai/clip-vit-large-patch14-336", "config.json") in fake_hub
    card = ModelCard.load(output / "README.md")
    assert f"`{PUBLISHED_FOLDER}`" in card.text
    assert card.data.base_model == "farewellthree/ppllava_weight"


def test_a_clip_weight_recorded_as_a_foreign_path_asks_for_the_prompt_encoder(tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(CHECKPOINT, folder)
    config = json.loads((folder / "config.json").read_text())
    config["clip_weight"] = "/group/ppllava/pretrained/clip-vit-large-patch14-336"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="--prompt-encoder openai/clip-vit-large-patch14-336"):
        convert_checkpoint(str(folder), str(tmp_path / "converted"))


def test_neither_a_folder_nor_a_hub_path_is_refused():
    with pytest.raises(ConversionError, match="neither a local folder nor a Hub path"):
        OriginalCheckpoint.resolve("ppllava_vicuna7b_image_video")


def test_cli_converts_verifies_and_pushes(fake_hub, monkeypatch, tmp_path, capsys):
    pushed = []

    class RecordingHfApi:
        def create_repo(self, repo_id, private=None, exist_ok=False):
            pushed.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            pushed.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(convert, "HfApi", RecordingHfApi)
    output = tmp_path / "converted"
    arguments = ["--input", PUBLISHED_FOLDER, "--output", str(output), "--reference-outputs", str(FIXTURE)]
    arguments += ["--remote-code", "--push-to-hub", "user/ppllava-tiny"]
    assert _load_cli().main(arguments) == 0
    assert pushed[0] == ("create_repo", "user/ppllava-tiny", None, True)
    assert pushed[1][:2] == ("upload_folder", "user/ppllava-tiny")
    assert {"README.md", "config.json", "model.safetensors", "modeling_ppllava.py"} <= set(pushed[1][2])
    assert 'from_pretrained("user/ppllava-tiny"' in (output / "README.md").read_text()
    assert "ok   video.logits" in capsys.readouterr().out


def test_cli_fails_when_the_reference_outputs_do_not_match(tmp_path, capsys):
    reference = tmp_path / "reference"
    shutil.copytree(FIXTURE, reference, ignore=shutil.ignore_patterns("checkpoint"))
    cases = reference / "cases.safetensors"
    tensors = load_file(cases)
    tensors["image.logits"] = tensors["image.logits"] + 1e-3
    save_file(tensors, cases)
    arguments = ["--input", str(CHECKPOINT), "--output", str(tmp_path / "converted"), "--reference-outputs", str(reference)]
    assert _load_cli().main(arguments) == 1
    assert "FAIL image.logits" in capsys.readouterr().err
    assert not (tmp_path / "converted").exists()  # a conversion that fails verification leaves nothing


# ---------------------------------------------------------------------------------------------------------------------
# The processor step


@pytest.fixture(scope="module")
def tokenizer_sources(tmp_path_factory) -> SimpleNamespace:
    """A synthetic Vicuna-layout checkpoint whose vocabulary fits the tiny tokenizers, and those tokenizers saved."""
    root = tmp_path_factory.mktemp("with-tokenizer")
    write_original_checkpoint(str(root / "original"), vicuna_layout(vocab=320, image_token_index=300))
    tiny_tokenizer("vicuna", image_token_id=300, video_token_id=301).save_pretrained(root / "tokenizer")
    tiny_prompt_tokenizer("vicuna", vocab_size=512).save_pretrained(root / "prompt_tokenizer")
    return SimpleNamespace(checkpoint=root / "original", tokenizer=root / "tokenizer", prompt_tokenizer=root / "prompt_tokenizer")


@pytest.fixture(scope="module")
def folder_with_processor(tokenizer_sources, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted") / "ppllava-with-processor"
    result = convert_checkpoint(
        str(tokenizer_sources.checkpoint), str(output), tokenizer=str(tokenizer_sources.tokenizer),
        prompt_tokenizer=str(tokenizer_sources.prompt_tokenizer), remote_code=True,
    )
    assert result.processor_saved
    return output


def test_a_tokenizer_source_gives_a_processor_that_feeds_the_converted_model(folder_with_processor):
    processor = AutoProcessor.from_pretrained(folder_with_processor)
    model = AutoModelForImageTextToText.from_pretrained(folder_with_processor).eval()
    ids = (processor.image_token_id, processor.video_token_id)
    assert ids == (300, 301) == (model.config.image_token_id, model.config.video_token_id)
    video = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    inputs = processor(text="USER: <video>\nwhat does the cat do? ASSISTANT:", videos=video)
    assert int((inputs["input_ids"] == 301).sum()) == model.model.video_pooling_plan(8).num_tokens
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_a_tokenizer_without_a_video_token_gets_one_on_a_free_row(tokenizer_sources, tmp_path):
    """LLaVA-NeXT tokenizers have <image> but no <video>; Vicuna's has <pad> right after <image>, so the video
    placeholder goes after that, and the converted config follows the tokenizer."""
    vocab = {f"word{i}": i for i in range(300)} | {"<image>": 300, "<pad>": 301}
    backend = Tokenizer(WordLevel(vocab, unk_token="word0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    TokenizersBackend(tokenizer_object=backend, pad_token="<pad>", unk_token="word0").save_pretrained(tmp_path / "tokenizer")
    output = tmp_path / "converted"
    result = convert_checkpoint(
        str(tokenizer_sources.checkpoint), str(output), tokenizer=str(tmp_path / "tokenizer"),
        prompt_tokenizer=str(tokenizer_sources.prompt_tokenizer),
    )
    assert result.config.video_token_id == 302
    assert json.loads((output / "config.json").read_text())["video_token_id"] == 302
    assert AutoProcessor.from_pretrained(output).video_token_id == 302


def test_a_tokenizer_whose_image_token_disagrees_with_the_checkpoint_is_refused(tokenizer_sources, tmp_path):
    tiny_tokenizer("vicuna", image_token_id=200, video_token_id=201).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ConversionError, match="tokenizer's <image> is 200, the checkpoint's image placeholder 300"):
        convert_checkpoint(
            str(tokenizer_sources.checkpoint), str(tmp_path / "converted"), tokenizer=str(tmp_path / "tokenizer"),
            prompt_tokenizer=str(tokenizer_sources.prompt_tokenizer),
        )
    assert not (tmp_path / "converted" / "model.safetensors").exists()


_LOAD_REMOTE_PROCESSOR = textwrap.dedent(
    r"""
    import json
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = sys.argv[1]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    video = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    inputs = processor(text="USER: <video>\nwhat does the cat do? ASSISTANT:", videos=video)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    print(json.dumps({
        "processor_class": type(processor).__module__ + "." + type(processor).__name__,
        "video_processor_class": type(processor.video_processor).__name__,
        "new_tokens": output.shape[1] - inputs["input_ids"].shape[1],
    }))
    """
)


def test_remote_code_processor_loads_and_feeds_the_model_without_ppllava_hf(folder_with_processor, tmp_path):
    run = _run_without_ppllava(_LOAD_REMOTE_PROCESSOR, str(folder_with_processor), home=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["processor_class"].startswith("transformers_modules.")
    assert result["processor_class"].endswith("processing_ppllava.PPLLaVAProcessor")
    assert result["video_processor_class"] == "PPLLaVAVideoProcessor"
    assert result["new_tokens"] == 3


def test_a_folder_written_before_the_layout_change_loads_and_gives_its_recorded_outputs():
    """A remote-code folder converted by the flat-layout package (see fixtures/previous_layout_remote_code/FIXTURE.md)
    loads with today's package classes and reproduces what that code computed."""
    folder = Path(__file__).parent / "fixtures" / "previous_layout_remote_code"
    reference = load_file(folder / "reference_outputs.safetensors")
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 50, 3), dtype=np.uint8)

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = processor(text="USER: <video>\nWhat happens in the video? ASSISTANT: ", videos=[frames])
    with torch.no_grad():
        logits = model(**inputs).logits

    assert type(model).__module__.startswith("ppllava_hf.") and type(processor).__module__.startswith("ppllava_hf.")
    for key in ("input_ids", "attention_mask", "pixel_values_videos", "clip_input_ids", "clip_attention_mask"):
        torch.testing.assert_close(inputs[key], reference[key], msg=key)
    torch.testing.assert_close(logits, reference["logits"], **float32_forward(reference["logits"]))
