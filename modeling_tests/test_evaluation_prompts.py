"""MVBench and VideoMME prompts, frame counts, subtitles and answer check against PPLLaVA's evaluation scripts.

Each expected string below is what the original code (`ppllava/test/mvbench/utils.py`, `ppllava/test/video_mme/utils.py`
and `ppllava/conversation/conv.py`, `plain_v1` / `plain_qwen`) builds for the same question, worked out by hand. The
original writes every visual placeholder as `<image>`; ours for a video is `<video>` (both become the visual tokens).
"""

import sys
from pathlib import Path

import pytest

from ppllava_hf.evaluation.prompts import (
    mvbench_answer,
    mvbench_is_correct,
    mvbench_prompt,
    render_prompt,
    videomme_num_frames,
    videomme_prompt,
    videomme_subtitles,
)
from ppllava_hf.testing.tiny import tiny_config, tiny_processor


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import evaluate_mcq  # noqa: E402


def as_ours(original: str) -> str:
    return original.replace("<image>\n", "<video>\n")


@pytest.fixture(scope="module")
def processors():
    return {layout: tiny_processor(tiny_config(layout)) for layout in ("vicuna", "qwen")}


COLOR_QUESTION = {"question": "What color is the moving object?", "candidates": ["red", "blue", "green", "white"],
                  "answer": "red", "task_type": "Moving Attribute", "video": "clip.mp4"}
# infer_mvbench_llava with system_llm=False (the published script's --system_llm is store_false): the user turn is
# qa_template's question + "\nOnly give the best option.", the assistant turn "Best option:(".
ORIGINAL_MVBENCH = {
    "vicuna": "USER: <image>\nQuestion: What color is the moving object?\nOptions:\n(A) red\n(B) blue\n(C) green\n"
              "(D) white\nOnly give the best option. ASSISTANT: Best option:(",
    "qwen": "<|im_start|>user\n<image>\nQuestion: What color is the moving object?\nOptions:\n(A) red\n(B) blue\n"
            "(C) green\n(D) white\nOnly give the best option.<|im_end|>\n<|im_start|>assistant\nBest option:(",
}


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_mvbench_prompt_equals_the_published_mvbench_run(processors, layout):
    prompt = mvbench_prompt(COLOR_QUESTION["question"], COLOR_QUESTION["candidates"])
    assert render_prompt(processors[layout], prompt) == as_ours(ORIGINAL_MVBENCH[layout])
    # The pooling prompt is qa_template's question, without the suffix.
    assert prompt.pooling_prompt == (
        "Question: What color is the moving object?\nOptions:\n(A) red\n(B) blue\n(C) green\n(D) white"
    )
    # The prediction is return_prompt "(" + the answer after the prefill.
    assert prompt.prediction(" A) red\n") == "(A) red"


def test_evaluate_mcq_asks_the_published_mvbench_prompt(processors):
    assert evaluate_mcq.mcq_prompt(processors["vicuna"], COLOR_QUESTION) == as_ours(ORIGINAL_MVBENCH["vicuna"])
    assert evaluate_mcq.sample_prompt(COLOR_QUESTION).pooling_prompt.startswith("Question: What color")


@pytest.mark.parametrize(
    "prediction, correct",
    [("(B) blue", True), ("(b)", True), ("(B.", True), ("(B)blue", True), ("(B", True), ("(", True),
     ("(A) red", False), ("(C)", False), ("(blue)", False)],
)
def test_mvbench_answer_check_is_the_originals(prediction, correct):
    # check_ans(pred, gt="(B) blue"): pred's first word without "." must be in "(b)", or contain it; "(" and "(B" pass.
    assert mvbench_answer(["red", "blue"], "blue") == "(B) blue"
    assert mvbench_is_correct(prediction, ["red", "blue"], "blue") is correct


def test_mvbench_answer_must_be_a_candidate():
    with pytest.raises(ValueError, match="not among the candidates"):
        mvbench_answer(["red", "blue"], "green")


APPLE_OPTIONS = ["A. One.", "B. Two.", "C. The man in the red jacket holds all of them.", "D. Nobody has apples."]
# infer_videomme_llava: the user turn is system + "\n" + question, question = row["question"] + "\n" +
# str(row["options"]), which pandas reads as a numpy array: numpy prints it space-separated, wrapped at 75 characters.
ORIGINAL_VIDEOMME = (
    "USER: <image>\nSelect the best answer to the following multiple-choice question based on the video and the "
    "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\nHow many apples are there?\n"
    "['A. One.' 'B. Two.' 'C. The man in the red jacket holds all of them.'\n 'D. Nobody has apples.'] "
    "ASSISTANT: The best answer is:"
)
# With --use_subtitles: "This video's subtitles are listed below: " + subtitles + " \n" before the instruction.
ORIGINAL_VIDEOMME_WITH_SUBTITLES = (
    "<|im_start|>user\n<image>\nThis video's subtitles are listed below: Look, apples. Two of them. \nSelect the best "
    "answer to the following multiple-choice question based on the video and the subtitles. Respond with only the "
    "letter (A, B, C, or D) of the correct option.\nHow many apples are there?\n['A. One.' 'B. Two.']<|im_end|>\n"
    "<|im_start|>assistant\nThe best answer is:"
)


def test_videomme_prompt_equals_the_published_videomme_run(processors):
    prompt = videomme_prompt("How many apples are there?", APPLE_OPTIONS)
    assert render_prompt(processors["vicuna"], prompt) == as_ours(ORIGINAL_VIDEOMME)
    assert prompt.pooling_prompt == (
        "How many apples are there?\n['A. One.' 'B. Two.' 'C. The man in the red jacket holds all of them.'\n"
        " 'D. Nobody has apples.']"
    )
    assert prompt.prediction(" B\n") == "B"
    with_subtitles = videomme_prompt("How many apples are there?", ["A. One.", "B. Two."], "Look, apples. Two of them.")
    assert render_prompt(processors["qwen"], with_subtitles) == as_ours(ORIGINAL_VIDEOMME_WITH_SUBTITLES)
    assert videomme_prompt("Q?", ["A. x"], subtitles="") == videomme_prompt("Q?", ["A. x"])


def test_videomme_samples_32_frames_of_short_videos_and_64_of_longer_ones():
    assert [videomme_num_frames(duration) for duration in ("short", "medium", "long")] == [32, 64, 64]
    with pytest.raises(ValueError, match="durations"):
        videomme_num_frames("tiny")


SRT = """1
00:00:01,000 --> 00:00:02,500
<font color="white" size=".72c">Look, apples.</font>

2
00:00:04,000 --> 00:00:05,000
<font color="white" size=".72c">Nobody sees this one.</font>

3
00:00:06,000 --> 00:00:08,000
<font color="white" size=".72c">Two of them.</font>

4
00:00:09,000 --> 00:00:10,000
[music]
"""


def test_videomme_subtitles_are_those_on_the_sampled_frames():
    # At 2 fps the subtitles span frames [2, 5), [8, 10), [12, 16), [18, 20); frames 4, 12 and 19 are sampled: the
    # first and third are shown, the fourth has no <font> text and is skipped, as extract_subtitles + the regex do.
    assert videomme_subtitles(SRT, [4, 12, 19], fps=2.0) == "Look, apples. Two of them."
    assert videomme_subtitles(SRT, [5, 10], fps=2.0) == ""
