"""Training and batch inference in two CPU processes (gloo), started the documented ways (torchrun, and accelerate
launch with examples/accelerate_configs/two_cpu_processes.yaml), against the same work done in one process: the same
loss curve for the same global batch, each video encoded once per step in each process, one checkpoint written by the
main process, and one merged, resumable JSONL of answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recorded_training import RUNS, recorded_run
from training_tester import needs_training_release, single_threaded  # noqa: F401  (a module fixture)
from transformers import AutoModelForImageTextToText, AutoProcessor

from ppllava_hf.testing.tiny_training_data import color_frames, write_color_videos


pytestmark = needs_training_release


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import batch_infer  # noqa: E402
from training_script import TINY_DEMO_DEFAULTS  # noqa: E402


# Four rows (four different videos), four steps of 4 rows: 2 per process and step under torchrun, 4 in one process.
# The middle frames: the recipes' random frame sampling draws in each process, and the curves compare on equal frames.
FLAGS = ("--use_cpu", "True", "--tiny_rows", "4", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "4",
         "--report_to", "none", "--disable_tqdm", "True", "--frame_sampling", "middle")
FRAMES = TINY_DEMO_DEFAULTS["num_frames"]
STEPS = 4


def launch(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The DPO and SFT examples' runs: {kind: (one-process record, [rank 0 record, rank 1 record], run folders)}."""
    one, two = tmp_path_factory.mktemp("one-process"), tmp_path_factory.mktemp("two-processes")
    launch("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "modeling_tests/recorded_training.py",
           str(two), *FLAGS)
    return {
        kind: (
            recorded_run(kind, one / kind, *FLAGS, "--per_device_train_batch_size", "4"),
            [json.loads((two / kind / f"rank{rank}.json").read_text()) for rank in (0, 1)],
            (one / kind, two / kind),
        )
        for kind in RUNS
    }


def logged(record: dict, key: str) -> list[float]:
    return [log[key] for log in record["log_history"] if key in log]


@pytest.mark.parametrize("kind, metrics", [("dpo", ("loss", "rewards/margins")), ("sft", ("loss", "mean_token_accuracy"))])
def test_two_processes_follow_the_one_process_curve_for_the_same_global_batch(runs, kind, metrics):
    single, ranks, _ = runs[kind]
    assert single["processes"] == 1
    for record in ranks:
        assert (record["processes"], record["distributed_type"]) == (2, "DistributedType.MULTI_CPU")
        for key in metrics:
            assert len(logged(record, key)) == STEPS
            torch.testing.assert_close(logged(record, key), logged(single, key), rtol=1e-5, atol=1e-6)
    assert logged(single, "loss")[-1] < logged(single, "loss")[0]  # the runs learn: the curves are not flat


@pytest.mark.parametrize("kind", list(RUNS))
def test_each_process_encodes_each_video_of_its_rows_once_per_step(runs, kind):
    """Two rows a step in each process (two preference pairs: four sequences), four in one process; a pair's chosen
    and rejected sequences share their video's encoding."""
    single, ranks, _ = runs[kind]
    assert single["frames_per_step"] == [4 * FRAMES] * STEPS
    assert [record["frames_per_step"] for record in ranks] == [[2 * FRAMES] * STEPS] * 2


@pytest.mark.parametrize("kind", list(RUNS))
def test_only_the_main_process_saves_and_its_checkpoint_answers_like_the_one_process_one(runs, kind):
    """Weights of parameters whose gradients are near zero (the BT-Adapter's temporal branch starts at zero) differ
    by up to the learning rate: Adam's first steps move by `lr * sign(gradient)`, and the sign of a near-zero gradient
    is rounding. The model's outputs agree."""
    _, ranks, (one, two) = runs[kind]
    assert [record["saved_models"] for record in ranks] == [[str(two / f"checkpoint-{STEPS}"), str(two)], []]
    checkpoint, final, single = (
        AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        for folder in (two / f"checkpoint-{STEPS}", two, one / f"checkpoint-{STEPS}")
    )
    assert all(torch.equal(weight, final.state_dict()[name]) for name, weight in checkpoint.state_dict().items())
    processor = AutoProcessor.from_pretrained(two / f"checkpoint-{STEPS}")
    inputs = processor(text="USER: <video>\nWhat color is the video? ASSISTANT: The video is red.",
                       videos=[color_frames("red", FRAMES)])
    with torch.no_grad():
        torch.testing.assert_close(checkpoint(**inputs).logits, single(**inputs).logits, rtol=1e-4, atol=5e-5)


def test_batch_inference_over_two_processes_resumes_and_writes_what_one_process_writes(tmp_path):
    videos = write_color_videos(tmp_path / "videos")
    rows = [{"id": color, "video": f"videos/{name}", "question": f"Is it {color}?"} for color, name in videos.items()]
    rows.insert(3, {"id": "missing", "video": "videos/no_such_video.mp4", "question": "What happens?"})
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["--input", str(questions), "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert batch_infer.main([*common, "--output", str(one)]) == {"answered": 4, "errors": 1, "skipped": 0}
    answers = one.read_text().splitlines()
    two.write_text(answers[0] + "\n")  # a finished row: the two processes share the other four, the missing video in the second's

    result = launch("accelerate.commands.launch", "--config_file", "examples/accelerate_configs/two_cpu_processes.yaml",
                    "examples/batch_infer.py", *common, "--output", str(two))
    assert "5 rows, 1 already in" in result.stdout and "4 to answer over 2 processes" in result.stdout
    assert two.read_text().splitlines() == answers
    assert '"error": "VideoDecodingError' in answers[3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.jsonl", "questions.jsonl", "two.jsonl", "videos"]


def test_two_process_batch_inference_exits_cleanly_run_after_run(tmp_path):
    """Every process tears its process group down before exiting: one left to the interpreter's shutdown can abort
    (SIGABRT, "terminate called without an active exception") after every row is written, failing torchrun's run."""
    videos = write_color_videos(tmp_path / "videos")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"video": f"videos/{name}", "question": "What colour?"}) + "\n"
                                 for name in videos.values()))
    for run in range(3):
        output = tmp_path / f"answers{run}.jsonl"
        result = launch("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "examples/batch_infer.py",
                        "--input", str(questions), "--output", str(output), "--batch-size", "2", "--device", "cpu",
                        "--max-new-tokens", "2")
        assert "terminate called" not in result.stderr
        assert len(output.read_text().splitlines()) == len(videos)
