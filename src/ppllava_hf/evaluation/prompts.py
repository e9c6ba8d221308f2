"""MVBench and VideoMME questions asked exactly as PPLLaVA's published evaluation asks them, and its MVBench answer check.

Written from `ppllava/test/mvbench/` and `ppllava/test/video_mme/` of github.com/farewellthree/PPLLaVA, as run by
`script/inference/mvbench/test_mvbench.sh` and `script/inference/videomme/test_videomme.sh`:

- MVBench (`--num-frames 32`): the script passes `--system_llm`, which its parser declares `store_false`, so the user
  turn has no system instruction: "Question: ...\\nOptions:\\n(A) ...\\n(B) ...\\nOnly give the best option."; the
  answer is prefilled with "Best option:(" and the prediction is "(" + the generated text.
- VideoMME (`--num-frames 0`): 32 frames for short videos, 64 for medium and long ones; the user turn is the
  "Select the best answer ..." instruction then the question and its options, after the subtitles of the sampled
  frames with `--use_subtitles`; the answer is prefilled with "The best answer is:".

In both, the question with its options (without instruction or suffix) is the pooling prompt, and the prompt is the
checkpoint's conversation format (`plain_v1` / `plain_qwen`, which the chat template reproduces) ending with the prefill.
"""

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ppllava_hf import PPLLaVAProcessor


MVBENCH_NUM_FRAMES = 32
MVBENCH_QUESTION_SUFFIX = "\nOnly give the best option."
MVBENCH_ANSWER_PREFILL = "Best option:("
MVBENCH_PREDICTION_PREFIX = "("

VIDEOMME_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
VIDEOMME_ANSWER_PREFILL = "The best answer is:"
VIDEOMME_NUM_FRAMES = {"short": 32, "medium": 64, "long": 64}
_VIDEOMME_SUBTITLE_TEXT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One question as a benchmark's evaluation asks it.

    Attributes:
        text: the text of the user turn (after its video).
        pooling_prompt: the text that guides the prompt-guided pooling.
        prefill: the start of the answer, written into the prompt after the assistant role.
        prediction_prefix: what the original puts before the generated text to form its prediction.
    """

    text: str
    pooling_prompt: str
    prefill: str = ""
    prediction_prefix: str = ""

    def prediction(self, generated: str) -> str:
        """The prediction the original scores for a generated answer (the text after the prefill)."""
        return self.prediction_prefix + generated.strip()


def render_prompt(processor: PPLLaVAProcessor, prompt: BenchmarkPrompt, media: Sequence[str] = ("video",)) -> str:
    """The full prompt text: one user turn with `media` placeholders ("video" / "image", in order) and `prompt.text`,
    in the processor's chat template, ready for the answer and ending with the prefill."""
    content = [{"type": kind} for kind in media] + [{"type": "text", "text": prompt.text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prompt.prefill


# ----------------------------------------------------------------------------------------------------------------------
# MVBench


def mvbench_question(question: str, candidates: Sequence[str]) -> str:
    """'Question: ...\\nOptions:\\n(A) ...\\n(B) ...': the question with its lettered candidates (the pooling prompt)."""
    options = "".join(f"({string.ascii_uppercase[index]}) {candidate}\n" for index, candidate in enumerate(candidates))
    return f"Question: {question}\nOptions:\n{options}".rstrip()


def mvbench_prompt(question: str, candidates: Sequence[str]) -> BenchmarkPrompt:
    """An MVBench question as PPLLaVA's published MVBench run asks it (no system instruction)."""
    block = mvbench_question(question, candidates)
    return BenchmarkPrompt(
        text=block + MVBENCH_QUESTION_SUFFIX,
        pooling_prompt=block,
        prefill=MVBENCH_ANSWER_PREFILL,
        prediction_prefix=MVBENCH_PREDICTION_PREFIX,
    )


def mvbench_answer(candidates: Sequence[str], answer: str) -> str:
    """The original's ground truth for a question: '(X) answer', X the letter of `answer` among `candidates`."""
    if answer not in candidates:
        raise ValueError(f"The answer {answer!r} is not among the candidates {list(candidates)}.")
    return f"({string.ascii_uppercase[list(candidates).index(answer)]}) {answer}"


def mvbench_is_correct(prediction: str, candidates: Sequence[str], answer: str) -> bool:
    """The original's answer check (`check_ans`): the prediction's first word (e.g. "(b)" of "(B) blue") without dots
    is part of the ground truth's option "(b)", or contains it; case-insensitive.

    As in the original, a prediction whose first word is a prefix of the option counts: "(B" and even "(" (an empty
    answer after the prefill) are correct for every question.
    """
    predicted = prediction.lower().split(" ")[0]
    truth = mvbench_answer(candidates, answer).lower().split(" ")[0]
    return predicted.replace(".", "") in truth or truth in predicted


# ----------------------------------------------------------------------------------------------------------------------
# VideoMME


def videomme_num_frames(duration: str) -> int:
    """Frames PPLLaVA samples from a VideoMME video of `duration` ("short", "medium" or "long"): 32, 64, 64."""
    if duration not in VIDEOMME_NUM_FRAMES:
        raise ValueError(f"VideoMME durations are {sorted(VIDEOMME_NUM_FRAMES)}, got {duration!r}.")
    return VIDEOMME_NUM_FRAMES[duration]


def videomme_options_text(options: Sequence[str]) -> str:
    """The options as the original writes them: it reads VideoMME's parquet file with pandas, so a question's options
    are a numpy array, and `str()` of it gives "['A. ...' 'B. ...' ...]" (wrapped at 75 characters, as numpy prints)."""
    return str(np.array(list(options), dtype=object))


def videomme_prompt(question: str, options: Sequence[str], subtitles: str | None = None) -> BenchmarkPrompt:
    """A VideoMME question as PPLLaVA's published VideoMME run asks it, after `subtitles` (see `videomme_subtitles`)
    when there are any."""
    block = question + "\n" + videomme_options_text(options)
    text = VIDEOMME_INSTRUCTION + "\n" + block
    if subtitles:
        text = "This video's subtitles are listed below: " + subtitles + " \n" + text
    return BenchmarkPrompt(text=text, pooling_prompt=block, prefill=VIDEOMME_ANSWER_PREFILL)


def parse_srt(srt_text: str) -> list[tuple[float, float, str]]:
    """(start seconds, end seconds, text) of each subtitle of an SRT file, as VideoMME's loader reads it: blocks
    separated by blank lines, a block's text lines joined by spaces, one entry per distinct time span (the last wins)."""
    subtitles = {}
    for block in srt_text.split("\n\n"):
        lines = block.split("\n")
        if not block.strip() or len(lines) < 3:
            continue
        start, end = (_srt_seconds(stamp) for stamp in lines[1].split(" --> "))
        subtitles[(start, end)] = " ".join(lines[2:])
    return [(start, end, text) for (start, end), text in subtitles.items()]


def _srt_seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.strip().split(":")
    seconds, milliseconds = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(milliseconds) / 1000


def videomme_subtitles(srt_text: str, frame_indices: Sequence[int], fps: float) -> str:
    """The subtitles shown at the sampled frames, as the original selects them: every subtitle whose frame span
    `[int(start * fps), int(end * fps))` holds a sampled frame index, in file order, its text inside VideoMME's
    `<font color="white" size=".72c">` tag (subtitles without it are skipped), joined by spaces."""
    shown = []
    for start, end, text in parse_srt(srt_text):
        first, stop = int(start * fps), int(end * fps)
        match = _VIDEOMME_SUBTITLE_TEXT.search(text)
        if match and any(first <= index < stop for index in frame_indices):
            shown.append(match.group(1))
    return " ".join(shown)
