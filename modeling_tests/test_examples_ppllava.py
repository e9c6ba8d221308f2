"""The README's commands and the example scripts, run on the embedded default and checked by what they produce."""

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from ppllava_hf import PPLLaVAForConditionalGeneration, PPLLaVAModel, PPLLaVAProcessor
from ppllava_hf.relevance import relevance_grid_size, video_relevance
from ppllava_hf.testing.embedded_default import SAMPLE_ANSWER, build_embedded_default


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import batch_infer  # noqa: E402
import chat  # noqa: E402
import evaluate_mcq  # noqa: E402


def readme_commands() -> list[str]:
    """The lines of the first bash block of the README's "Quick start" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, str]:
    """Run the quickstart exactly as the README's first command does (after its setup steps), in a scratch folder;
    return the output folder and what it printed."""
    command = readme_commands()[0].split("&&")[-1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "examples/quickstart.py"], command
    workdir = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return workdir / argv[argv.index("--output-dir") + 1], result.stdout


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        return image.size


# ----------------------------------------------------------------------------------------------------------------------
# README and CI


def test_readme_starts_with_setup_plus_quickstart_then_the_test_command_that_ci_runs():
    setup_and_run, tests = readme_commands()[:2]
    assert "pip install -e" in setup_and_run and "examples/quickstart.py --output-dir" in setup_and_run
    # No lmms-eval in the first command: installed before the package, its unmet pins make pip print an ERROR block.
    assert "lmms-eval" not in setup_and_run
    assert tests.startswith('pip install --no-deps "lmms-eval') and tests.endswith("&& python -m pytest -q modeling_tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'bash -euo pipefail -c "$(readme_command 2)"' in ci  # run_suite runs the README's line as written
    assert re.search(r"^run_suite oldest$.*^run_suite newest$", ci, re.S | re.M)


def test_readme_quickstart_prints_token_counts_the_right_answer_and_the_moment_the_ball_is_in_view(quickstart):
    _, stdout = quickstart
    assert "16 frames x 6x6 patches = 576 patch features -> 32 pooled tokens" in stdout
    assert f"answer     '{SAMPLE_ANSWER}'" in stdout
    assert re.search(r"#1 \d+\.\d\d-\d+\.\d\ds \(peak", stdout)
    assert float(re.search(r"IoU ([\d.]+) with #1", stdout).group(1)) >= 0.5
    on_ball, area = map(int, re.search(r"(\d+)% of the relevance lies on the ball's patches, (\d+)%", stdout).groups())
    assert on_ball >= 80 and area <= 10


def test_readme_quickstart_writes_heatmap_and_timeline_pngs_of_the_expected_size(quickstart):
    folder, _ = quickstart
    assert png_size(folder / "heatmap.png") == relevance_grid_size(16, 84, 84) == (1536, 424)
    assert png_size(folder / "timeline.png") == (960, 320)


def test_readme_quickstart_leaves_the_embedded_default_as_an_auto_loadable_folder(quickstart):
    folder, _ = quickstart
    model = AutoModelForImageTextToText.from_pretrained(folder / "model")
    processor = AutoProcessor.from_pretrained(folder / "model")
    assert isinstance(model, PPLLaVAForConditionalGeneration) and isinstance(processor, PPLLaVAProcessor)
    reference, _ = build_embedded_default()
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert processor.video_processor.num_frames == 16


# ----------------------------------------------------------------------------------------------------------------------
# chat.py


class EncodingCounter:
    """Counts the video and image encodings of every PPLLaVA model while installed."""

    def __init__(self, monkeypatch):
        self.videos = self.images = 0
        video_features, image_features = PPLLaVAModel.get_video_features, PPLLaVAModel.get_image_features

        def count_videos(model, *args, **kwargs):
            self.videos += 1
            return video_features(model, *args, **kwargs)

        def count_images(model, *args, **kwargs):
            self.images += 1
            return image_features(model, *args, **kwargs)

        monkeypatch.setattr(PPLLaVAModel, "get_video_features", count_videos)
        monkeypatch.setattr(PPLLaVAModel, "get_image_features", count_images)


def test_chat_reusing_the_first_question_tokens_answers_twice_with_one_video_encoding(quickstart, monkeypatch, capsys):
    folder, _ = quickstart
    counter = EncodingCounter(monkeypatch)
    session = chat.main(["--model", str(folder / "model"), "--video", str(folder / "sample.mp4"),
                         "--message", "What happens?", "--message", "Where does the ball go?", "--max-new-tokens", "6",
                         "--reuse-first-question-tokens"])
    assert counter.videos == 1
    answers = [message for message in session.messages if message["role"] == "assistant"]
    assert len(answers) == 2
    printed = capsys.readouterr().out
    assert printed.count("ppllava> ") == 2 and "you> Where does the ball go?" in printed
    # What was streamed is what was answered.
    for answer in answers:
        assert answer["content"][0]["text"] in printed
    # The second turn's prompt carries the first exchange.
    prompt = session.processor.apply_chat_template(session.messages, tokenize=False)
    assert prompt.count("USER: ") == 2 and prompt.count("<video>") == 1


def test_chat_encodes_again_for_each_question_by_default(monkeypatch, capsys):
    counter = EncodingCounter(monkeypatch)
    chat.main(["--message", "What happens?", "--message", "Why?", "--max-new-tokens", "3"])
    assert counter.videos == 2


@pytest.mark.parametrize(("flags", "pooled_under"), [([], "How many balls are there?"),
                                                      (["--reuse-first-question-tokens"], "What colour is the ball?")])
def test_chat_pools_a_later_turn_under_its_own_question_unless_reuse_is_asked_for(flags, pooled_under, capsys):
    session = chat.main(["--message", "What colour is the ball?", "--message", "How many balls are there?",
                         "--max-new-tokens", "3", *flags])
    alone = video_relevance(session.model, session.processor, session.media["video"], pooled_under)
    # The same float32 vision pass and softmax over the same frames and prompt: equal to float32 rounding.
    torch.testing.assert_close(session.encoded["video"].relevance[0].float().cpu(), alone.relevance,
                               rtol=1e-5, atol=1e-7)


def test_chat_about_an_image_reads_messages_from_stdin(tmp_path, monkeypatch, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(image)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What color is the car?\nWhy?\n\nnot reached\n"))
    counter = EncodingCounter(monkeypatch)
    session = chat.main(["--image", str(image), "--max-new-tokens", "3"])
    assert counter.images == 2 and counter.videos == 0  # one encoding per question
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert "you> Why?" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# batch_infer.py


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_infer_answers_records_errors_and_resumes(quickstart, tmp_path, capsys):
    folder, _ = quickstart
    video = str(folder / "sample.mp4")
    questions = tmp_path / "questions.jsonl"
    rows = [
        {"id": "ball", "video": video, "question": "Where does the red ball go?"},
        {"id": "missing", "video": "no_such_video.mp4", "question": "What happens?"},
        {"video": video, "question": "What happens at the start?", "start_time": 0.0, "end_time": 1.0},
    ]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "answers.jsonl"
    common = ["--model", str(folder / "model"), "--input", str(questions), "--output", str(output), "--max-new-tokens", "5"]

    counts = batch_infer.main([*common, "--batch-size", "2"])
    assert counts == {"answered": 2, "errors": 1, "skipped": 0}
    first = read_jsonl(output)
    assert [row["id"] for row in first] == ["ball", "missing", 3]  # a row without an id is known by its line number
    assert first[0]["question"] == rows[0]["question"] and isinstance(first[0]["answer"], str)
    assert "error" not in first[0] and "answer" not in first[1]
    assert first[1]["error"].startswith("VideoDecodingError") and "no_such_video.mp4" in first[1]["error"]

    # Answered one by one, each row gets what it got in the left-padded batch.
    single = tmp_path / "single.jsonl"
    batch_infer.main(["--model", str(folder / "model"), "--input", str(questions), "--output", str(single),
                      "--max-new-tokens", "5", "--batch-size", "1"])
    assert [row.get("answer") for row in read_jsonl(single)] == [row.get("answer") for row in first]

    # A rerun skips every finished row and loads no model; a new row is the only one answered.
    assert batch_infer.main(common) == {"answered": 0, "errors": 0, "skipped": 3}
    with questions.open("a") as file:
        file.write(json.dumps({"id": "new", "video": video, "question": "Is it sunny?"}) + "\n")
    assert batch_infer.main(common) == {"answered": 1, "errors": 0, "skipped": 3}
    assert [row["id"] for row in read_jsonl(output)] == ["ball", "missing", 3, "new"]

    # --retry-errors drops the failed row and runs it again (here it fails again, and is recorded once).
    assert batch_infer.main([*common, "--retry-errors"]) == {"answered": 0, "errors": 1, "skipped": 3}
    assert sorted(map(str, (row["id"] for row in read_jsonl(output)))) == ["3", "ball", "missing", "new"]


def test_batch_infer_answers_every_video_of_a_folder(quickstart, tmp_path, capsys):
    folder, _ = quickstart
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mkv"):
        (videos / name).write_bytes((folder / "sample.mp4").read_bytes())
    (videos / "notes.txt").write_text("not a video")
    (videos / "broken.mp4").write_bytes(b"not a video either")
    output = tmp_path / "answers.jsonl"
    counts = batch_infer.main(["--input", str(videos), "--question", "What happens?", "--output", str(output),
                               "--max-new-tokens", "4"])
    assert counts == {"answered": 2, "errors": 1, "skipped": 0}
    rows = {row["id"]: row for row in read_jsonl(output)}
    assert set(rows) == {"a.mp4", "b.mkv", "broken.mp4"}
    assert rows["a.mp4"]["answer"] == rows["b.mkv"]["answer"]  # same clip, same question
    assert "error" in rows["broken.mp4"]


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_mcq.py

SAMPLES = evaluate_mcq.load_samples(ROOT / "examples" / "data" / "red_ball_mcq.json")


def test_mcq_accuracy_with_forced_answers_equals_the_hand_computed_values(capsys):
    # The sample's answers are (B), (A), (B), (A), (B), (B). Forced answers (the text after "Best option:("), scored as
    # PPLLaVA's check_ans does ("(" + answer; its first word must be part of the answer's option, or contain it):
    forced = ["B) From left to right.", "C", "(A) 0", "A.", None, "b)no"]
    # right, wrong, wrong ("((a)" is not part of "(b)"), right, unreadable video (wrong), right ("(b)no" holds "(b)").
    errors = [None, None, None, None, "VideoDecodingError: gone", None]
    answers = iter(zip(forced, errors))
    results = evaluate_mcq.evaluate(SAMPLES, lambda batch: [next(answers) for _ in batch], batch_size=4)
    assert [record["correct"] for record in results["results"]] == [True, False, False, True, False, True]
    assert results["counts"] == {
        "Moving Direction": {"correct": 1, "total": 1},
        "Moving Attribute": {"correct": 0, "total": 1},
        "Moving Count": {"correct": 0, "total": 1},
        "Object Existence": {"correct": 2, "total": 3},
    }
    assert results["accuracy"]["overall"] == pytest.approx(50.0)
    assert results["accuracy"]["Object Existence"] == pytest.approx(200 / 3)
    assert results["accuracy"]["task_mean"] == pytest.approx((100 + 0 + 0 + 200 / 3) / 4)
    assert results["errors"] == 1 and results["results"][4]["error"] == "VideoDecodingError: gone"
    assert results["results"][0]["prediction"] == "(B) From left to right."
    assert results["results"][0]["answer_option"] == "(B) From left to right."


def test_evaluate_mcq_runs_the_embedded_default_and_writes_consistent_results(quickstart, tmp_path, capsys):
    folder, _ = quickstart
    output = tmp_path / "results.json"
    evaluate_mcq.main(["--data", str(ROOT / "examples" / "data" / "red_ball_mcq.json"), "--video-root", str(folder),
                       "--output", str(output), "--max-new-tokens", "3"])
    results = json.loads(output.read_text())
    records = results["results"]
    assert len(records) == len(SAMPLES) and results["errors"] == 0
    assert all(record["prediction"].startswith("(") for record in records)
    assert results["accuracy"]["overall"] == pytest.approx(100 * sum(r["correct"] for r in records) / len(records))
    assert {task: count["total"] for task, count in results["counts"].items()} == {
        "Moving Direction": 1, "Moving Attribute": 1, "Moving Count": 1, "Object Existence": 3,
    }
    assert "overall" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Pipelines


def test_image_text_to_text_pipeline_runs_images_and_video_chats_like_generate(quickstart, caplog):
    folder, _ = quickstart
    pipe = pipeline("image-text-to-text", model=str(folder / "model"))
    assert not [record for record in caplog.records if "is not supported" in record.getMessage()]
    model, processor = pipe.model, pipe.processor

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 150, 3), dtype=np.uint8))
    text = "USER: <image>\nWhat is in the picture? ASSISTANT: "
    inputs = processor(text=text, images=image)
    expected = processor.decode(model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)
    output = pipe(images=image, text=text, max_new_tokens=6, return_full_text=False)
    assert output[0]["generated_text"].strip() == expected.strip()

    messages = [{"role": "user", "content": [{"type": "video", "path": str(folder / "sample.mp4")},
                                             {"type": "text", "text": "What happens?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["pixel_values_videos"].shape[:2] == (1, 16)
    expected = processor.decode(model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)
    output = pipe(text=messages, max_new_tokens=6, return_full_text=False)
    assert output[0]["generated_text"].strip() == expected.strip()


def test_any_to_any_pipeline_needs_torchvision():
    pytest.importorskip("PIL")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed")
    model, processor = build_embedded_default()
    with pytest.raises(ImportError, match="Torchvision"):
        pipeline("any-to-any", model=model, processor=processor)
