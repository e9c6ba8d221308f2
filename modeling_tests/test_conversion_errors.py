"""Conversion refusals and failures: the command line says what is wrong in a line and exits 1, a local path is never
looked up on the Hub, and a conversion that fails at any point leaves no output folder behind (complete or nothing)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
from original_format import FIXTURE, vicuna_layout, write_original_checkpoint
from safetensors.torch import load_file, save_file

from ppllava_hf.conversion import cli, convert, original_checkpoint
from ppllava_hf.conversion.convert import convert_checkpoint
from ppllava_hf.conversion.rules import ConversionError


CHECKPOINT = FIXTURE / "checkpoint"


@pytest.fixture
def no_hub(monkeypatch) -> list:
    """Every Hub download the conversion attempts (each one fails the conversion)."""
    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise OSError("the tests never reach the Hub")

    monkeypatch.setattr(original_checkpoint, "snapshot_download", record)
    monkeypatch.setattr(original_checkpoint, "hf_hub_download", record)
    return calls


def _leftovers(folder: Path) -> list[str]:
    """Staging folders a conversion left in `folder`."""
    return [name for name in os.listdir(folder) if ".partial-" in name]


def _defective_checkpoint(tmp_path: Path, defect: str) -> tuple[str, str]:
    """A copy of the fixture with one defect; returns the --input argument and what the error must say (the working
    folder is `tmp_path`)."""
    folder = tmp_path / "original"
    shutil.copytree(CHECKPOINT, folder)
    if defect == "missing folder":
        return str(tmp_path / "no-such-checkpoint"), f"does not exist \\(looked for {tmp_path / 'no-such-checkpoint'}\\)"
    if defect == "missing folder under an existing one":
        # `checkpoints/ppllava_vicuna7b` has the shape of a Hub path owner/repo, but `checkpoints/` is a local folder.
        (tmp_path / "checkpoints").mkdir()
        return "checkpoints/ppllava_vicuna7b", "'checkpoints/ppllava_vicuna7b' does not exist"
    if defect == "invalid config.json":
        (folder / "config.json").write_text('{"model_type": "llava_next",')
        return str(folder), f"{folder / 'config.json'} is not valid JSON"
    if defect == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return str(folder), f"Cannot read the weight file {weights} \\(.*\\); it may be truncated"
    if defect == "non-finite weight":
        weights = folder / "model.safetensors"
        tensors = load_file(weights)
        key = next(key for key, tensor in tensors.items() if tensor.is_floating_point())
        tensors[key][0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
        return str(folder), f"The weight {re.escape(key)} \\(\\d+ of \\d+ values\\) in {weights} is NaN or infinite"
    if defect == "no text_config":
        config = json.loads((folder / "config.json").read_text())
        del config["text_config"]
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder), "config.json has no text_config: it is not a complete original PPLLaVA config"
    shutil.rmtree(folder / "clip")
    return str(folder), f"clip_weight 'clip' names a folder beside the checkpoint, {folder / 'clip'}, which does not exist"


DEFECTS = ["missing folder", "missing folder under an existing one", "invalid config.json", "truncated weights",
           "non-finite weight", "no text_config", "no clip folder"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_the_cli_names_the_problem_in_a_line_without_the_hub_or_a_traceback(tmp_path, monkeypatch, no_hub, capsys, defect):
    monkeypatch.chdir(tmp_path)
    source, message = _defective_checkpoint(tmp_path, defect)
    output = tmp_path / "converted"
    assert cli.main(["--input", source, "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith(f"Nothing was written to {output}.\n") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert no_hub == []
    assert not output.exists() and _leftovers(tmp_path) == []


def test_an_output_below_a_file_is_refused_in_a_line_leaving_the_file_as_it_was(tmp_path, no_hub, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    assert cli.main(["--input", str(CHECKPOINT), "--output", str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert f"inside {blocker}, which is a file, not a folder (NotADirectoryError)" in err and err.count("\n") == 1, err
    assert blocker.read_text() == "mine" and _leftovers(tmp_path) == []


def test_a_prompt_encoder_config_that_is_not_clip_or_siglip_is_named(tmp_path, no_hub):
    folder = tmp_path / "original"
    shutil.copytree(CHECKPOINT, folder)
    (folder / "clip" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="not a CLIP/SigLIP model config"):
        convert_checkpoint(str(folder), str(tmp_path / "converted"))


_CONVERT_WITH_A_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    from ppllava_hf.conversion.cli import main

    # A write past the limit fails with EFBIG (as on a full disk) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_fails_half_way_leaves_nothing_and_the_rerun_succeeds(tmp_path):
    """Five shards; files may not grow past the midpoint between the first shard's size and the second's, so the first
    is written and the second fails, as on a disk that fills up."""
    original = tmp_path / "original"
    write_original_checkpoint(str(original), vicuna_layout(), num_shards=5)
    sizes = [path.stat().st_size for path in sorted(original.glob("*.safetensors"))]
    assert sizes[0] < sizes[1]
    output = tmp_path / "new" / "parents" / "converted"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    arguments = [str((sizes[0] + sizes[1]) // 2), "--input", str(original), "--output", str(output)]
    run = subprocess.run(
        [sys.executable, "-c", _CONVERT_WITH_A_FILE_SIZE_LIMIT, *arguments], env=env, capture_output=True, text=True
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    written = r"^error: Writing the weight file model-00002-of-00005.safetensors failed \(.*File too large.*\)\. Nothing"
    assert re.search(written, run.stderr, flags=re.MULTILINE), run.stderr
    assert not (tmp_path / "new").exists()  # the parents it created are gone too
    convert_checkpoint(str(original), str(output))
    assert len(list(output.glob("model-*.safetensors"))) == 5 and _leftovers(output.parent) == []


def test_an_error_found_after_the_weights_were_written_leaves_the_empty_output_as_it_was(tmp_path, monkeypatch):
    output = tmp_path / "converted"
    output.mkdir()
    written = []

    def fails_late(folder, config, with_processor=False):
        written.extend(os.listdir(folder))
        raise KeyError("auto_map")

    monkeypatch.setattr(convert, "save_remote_code", fails_late)
    with pytest.raises(KeyError, match="auto_map"):
        convert_checkpoint(str(CHECKPOINT), str(output), remote_code=True)
    assert "model.safetensors" in written
    assert output.is_dir() and os.listdir(output) == [] and _leftovers(tmp_path) == []


def test_a_disk_without_room_for_the_weights_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=300_000))
    with pytest.raises(ConversionError, match=r"needs about 1.7 MiB but .* has 0.3 MiB free; free some space"):
        convert_checkpoint(str(CHECKPOINT), str(tmp_path / "converted"))
    assert os.listdir(tmp_path) == []


def test_the_converter_is_a_console_script_with_the_modules_entry_point():
    """`ppllava-convert`, `python -m ppllava_hf.conversion` and the root convert_checkpoints.py run one function."""
    (script,) = entry_points(group="console_scripts", name="ppllava-convert")
    assert script.value == "ppllava_hf.conversion.cli:run"
    assert script.load() is cli.run
    root_script = Path(__file__).resolve().parents[1] / "convert_checkpoints.py"
    result = subprocess.run([sys.executable, str(root_script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--input" in result.stdout
