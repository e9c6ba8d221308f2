"""Ordinary mistakes in the examples a user runs first: one line on stderr and exit status 1 (no traceback unless
`--debug`), nothing the user made written over, and every good row of a batch answered."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.testing.embedded_default import write_sample_video
from ppllava_hf.testing.tiny import tiny_config, tiny_processor


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import batch_infer  # noqa: E402
import quickstart  # noqa: E402


def run_example(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    """What a script said on stderr, without the progress bars and the transformers-version notice."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "Traceback"))]


# ----------------------------------------------------------------------------------------------------------------------
# quickstart.py


@pytest.fixture
def another_model(tmp_path) -> Path:
    """An output folder whose model/ holds a model the user saved (a random tiny PPLLaVA)."""
    folder = tmp_path / "out" / "model"
    torch.manual_seed(0)
    PPLLaVAForConditionalGeneration(tiny_config("vicuna")).save_pretrained(folder)
    tiny_processor("vicuna").save_pretrained(folder)
    return folder


def test_quickstart_refuses_an_output_dir_whose_model_folder_holds_another_model(another_model, tmp_path):
    before = {path: path.read_bytes() for path in another_model.rglob("*") if path.is_file()}
    result = run_example("quickstart.py", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"error: {Path('out') / 'model'} already exists and holds something else than what this script writes there; "
        "it was left as it is: choose another --output-dir, or move it away."
    ]
    assert {path: path.read_bytes() for path in another_model.rglob("*") if path.is_file()} == before
    assert [path.name for path in another_model.parent.iterdir() if ".partial-" in path.name] == []


def test_quickstart_run_again_into_its_own_output_dir_succeeds(tmp_path, capsys):
    quickstart.main(["--output-dir", str(tmp_path / "out"), "--max-new-tokens", "2"])
    weights = (tmp_path / "out" / "model" / "model.safetensors").read_bytes()
    quickstart.main(["--output-dir", str(tmp_path / "out"), "--max-new-tokens", "2"])
    assert (tmp_path / "out" / "model" / "model.safetensors").read_bytes() == weights
    assert "reuse it with --model" in capsys.readouterr().out


def test_quickstart_refuses_a_sample_mp4_of_the_users_own(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sample.mp4").write_bytes(b"my holiday video")
    with pytest.raises(SystemExit, match=r"^error: .*sample\.mp4 already exists and holds something else"):
        quickstart.main(["--output-dir", str(tmp_path / "out"), "--max-new-tokens", "2"])
    assert (tmp_path / "out" / "sample.mp4").read_bytes() == b"my holiday video"


@pytest.mark.parametrize("below", [False, True])
def test_quickstart_refuses_an_output_dir_that_is_or_lies_below_a_file(tmp_path, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    output = blocker / "out" if below else blocker
    where = f"is below {blocker}, which is a file" if below else "is a file"
    with pytest.raises(SystemExit, match=rf"^error: --output-dir {output} {where}, not a folder; choose a folder\.$"):
        quickstart.main(["--output-dir", str(output)])
    assert blocker.read_text() == "mine"


def test_quickstart_on_a_full_disk_ends_in_one_line_leaving_no_partial_file(tmp_path, monkeypatch):
    def full_disk(path):
        Path(path).write_bytes(b"half a vid")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(quickstart, "write_sample_video", full_disk)
    with pytest.raises(SystemExit, match=r"^error: \[Errno 28\] No space left on device: "):
        quickstart.main(["--output-dir", str(tmp_path / "out")])
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model"]


def test_quickstart_names_a_missing_video_in_one_line_and_exits_1(tmp_path):
    result = run_example("quickstart.py", "--output-dir", "out", "--video", "nope.mp4", cwd=tmp_path)
    assert result.returncode == 1
    assert error_lines(result.stderr) == ["error: --video nope.mp4 does not exist; pass a video file or frame folder."]
    assert not (tmp_path / "out").exists()


def test_quickstart_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="--video nope.mp4 does not exist"):
        quickstart.main(["--output-dir", str(tmp_path / "out"), "--video", "nope.mp4", "--debug"])


# ----------------------------------------------------------------------------------------------------------------------
# batch_infer.py


@pytest.fixture
def video(tmp_path) -> str:
    return str(write_sample_video(tmp_path / "clip.mp4"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_infer_records_a_bad_line_as_an_error_row_naming_it_and_answers_every_good_row(tmp_path, video):
    questions = tmp_path / "q.jsonl"
    good = json.dumps({"id": "ball", "video": video, "question": "Where does the red ball go?"})
    questions.write_text("\n".join([good, "{broken", "[1, 2]", json.dumps({"video": 5, "question": "x"}), "",
                                    json.dumps({"video": video, "question": "What colour is the ball?"})]) + "\n")
    output = tmp_path / "answers.jsonl"
    counts = batch_infer.main(["--input", str(questions), "--output", str(output), "--max-new-tokens", "3"])
    assert counts == {"answered": 2, "errors": 3, "skipped": 0}
    rows = read_jsonl(output)
    assert [row["id"] for row in rows] == ["ball", 2, 3, 4, 6]
    assert [("answer" in row) for row in rows] == [True, False, False, False, True]
    assert rows[1]["error"].startswith(f"line 2 of {questions} is not valid JSON (")
    assert rows[2]["error"] == f'line 3 of {questions} is a JSON list, not an object {{"video": ..., ...}}'
    assert rows[3]["error"] == f"line 4 of {questions}: its video must be a path"


@pytest.mark.parametrize("kind", ["folder", "input", "foreign file", "below a file"])
def test_batch_infer_refuses_an_output_it_would_misread_or_write_into(tmp_path, video, kind):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "ball", "video": video, "question": "Where?"}) + "\n")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    output, message = {
        "folder": (tmp_path, f"--output {tmp_path} is a folder; give the path of a JSONL file of answers."),
        "input": (questions, f"--output {questions} is the --input file; give another path for the answers."),
        "foreign file": (foreign, f"--output {foreign} is not a JSONL file of answers (line 1 is not a row with an id "
                                  "and an answer or error); choose a new file, or the output of an earlier run"),
        "below a file": (foreign / "a.jsonl", f"--output {foreign / 'a.jsonl'} is below {foreign}, which is a file"),
    }[kind]
    before = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    with pytest.raises(SystemExit) as refusal:
        batch_infer.main(["--input", str(questions), "--output", str(output)])
    assert str(refusal.value.code).startswith(f"error: {message}")
    assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_batch_infer_names_a_missing_input_in_one_line_and_exits_1(tmp_path):
    result = run_example("batch_infer.py", "--input", "nope.jsonl", "--output", "a.jsonl", cwd=tmp_path)
    assert result.returncode == 1
    message = "error: --input nope.jsonl does not exist; pass a folder of videos or a JSONL file."
    assert error_lines(result.stderr) == [message]
    assert not (tmp_path / "a.jsonl").exists()
