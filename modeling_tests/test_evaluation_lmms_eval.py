"""The `ppllava` lmms-eval model on the embedded default: found through lmms-eval's own registry, answering hand-built
lmms-eval requests on a real mp4 as direct `generate` calls do, and running a local task through lmms-eval's CLI.

lmms-eval is imported normally: it is part of the test environment (`pip install --no-deps lmms-eval` and the `eval`
extra), so these tests fail, not skip, where it is missing.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from transformers import AutoModelForImageTextToText, AutoProcessor

from ppllava_hf.evaluation.lmms_eval_model import PPLLaVALmmsEval, cut_at_stop, generation_options
from ppllava_hf.evaluation.prompts import BenchmarkPrompt, mvbench_prompt, render_prompt, videomme_prompt
from ppllava_hf.testing.embedded_default import save_embedded_default, write_sample_video


ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The embedded default saved as a model folder, and the sample clip (a red ball crossing a meadow, 4 s)."""
    folder = tmp_path_factory.mktemp("lmms_eval")
    return {"model": save_embedded_default(folder / "model"), "video": write_sample_video(folder / "ball.mp4")}


@pytest.fixture(scope="module")
def lm(files) -> PPLLaVALmmsEval:
    """The model as lmms-eval builds it from `--model ppllava --model_args ...` (a batch of 2)."""
    return get_model("ppllava").create_from_arg_string(f"pretrained={files['model']},batch_size=2", {"device": "cpu"})


@pytest.fixture(scope="module")
def direct(files):
    """The same checkpoint loaded with the Auto classes, to compute what the model should answer."""
    return AutoModelForImageTextToText.from_pretrained(files["model"]).eval(), AutoProcessor.from_pretrained(files["model"])


@pytest.fixture
def processor_calls(lm, monkeypatch) -> list[dict]:
    """The keyword arguments of every call of the model's processor during a test."""
    calls = []
    processor_call = type(lm.processor).__call__

    def recording_call(processor, **kwargs):
        calls.append(kwargs)
        return processor_call(processor, **kwargs)

    monkeypatch.setattr(type(lm.processor), "__call__", recording_call)
    return calls


def request(request_type: str, arguments: tuple, task: str, doc_id: int) -> Instance:
    metadata = {"task": task, "doc_id": doc_id, "repeats": 1}
    return Instance(request_type=request_type, arguments=arguments, idx=0, metadata=metadata)


def doc_video(doc: dict) -> list[str]:
    return [doc["video"]]


@torch.no_grad()
def direct_answer(direct, prompt, video: Path, num_frames: int, max_new_tokens: int = 4) -> str:
    """What greedy `generate` answers to `prompt` about `video` (`num_frames` frames), in the prompt's prediction form."""
    model, processor = direct
    inputs = processor(text=render_prompt(processor, prompt), videos=str(video), num_frames=num_frames,
                       pooling_prompt=prompt.pooling_prompt)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return prompt.prediction(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def test_ppllava_resolves_through_lmms_eval_entry_points(lm):
    assert get_model("ppllava") is PPLLaVALmmsEval
    assert isinstance(lm, PPLLaVALmmsEval) and lm.batch_size == 2 and lm.device == torch.device("cpu")


def test_generate_until_asks_mvbench_videomme_and_other_tasks_as_ppllava_does(lm, direct, files, processor_calls):
    video = str(files["video"])
    mvbench = [
        {"video": video, "question": "What color is the ball?", "candidates": ["red", "blue"], "answer": "red"},
        {"video": video, "question": "Where does it go?", "candidates": ["left", "right", "up"], "answer": "right"},
    ]
    videomme = [{"video": video, "videoID": "ball", "duration": "medium", "question": "How many balls?",
                 "options": ["A. One.", "B. Two.", "C. Three.", "D. None."], "answer": "A"}]
    lm.task_dict = {"mvbench_moving_attribute": {"train": mvbench}, "videomme": {"test": videomme},
                    "local_caption": {"test": [{"video": video}]}}
    requests = [
        request("generate_until", ("task text", dict(GREEDY), doc_video, 0, "mvbench_moving_attribute", "train"),
                "mvbench_moving_attribute", 0),
        request("generate_until", ("<image>Describe the video.", dict(GREEDY), doc_video, 0, "local_caption", "test"),
                "local_caption", 0),
        request("generate_until", ("task text", dict(GREEDY), doc_video, 1, "mvbench_moving_attribute", "train"),
                "mvbench_moving_attribute", 1),
        request("generate_until", ("task text", dict(GREEDY), doc_video, 0, "videomme", "test"), "videomme", 0),
    ]
    # MVBench: PPLLaVA's prompt and 32 frames, "(" + the answer; VideoMME: 64 frames for a medium video; any other task:
    # its text (placeholders dropped: the template places the video) with the processor's 16 frames.
    prompts = [
        (mvbench_prompt(mvbench[0]["question"], mvbench[0]["candidates"]), 32),
        (BenchmarkPrompt("Describe the video.", "Describe the video."), 16),
        (mvbench_prompt(mvbench[1]["question"], mvbench[1]["candidates"]), 32),
        (videomme_prompt(videomme[0]["question"], videomme[0]["options"]), 64),
    ]
    answers = lm.generate_until(requests)
    asked = [(text, pooling, len(video)) for call in processor_calls
             for text, pooling, video in zip(call["text"], call["pooling_prompt"], call["videos"])]
    assert sorted(asked) == sorted((render_prompt(lm.processor, prompt), prompt.pooling_prompt, frames)
                                   for prompt, frames in prompts)
    assert [len(call["text"]) for call in processor_calls] == [2, 2]
    assert {call["padding_side"] for call in processor_calls} == {"left"}
    # The batched, left-padded answers are those of one greedy `generate` per question, in the requests' order.
    assert answers == [direct_answer(direct, prompt, files["video"], frames) for prompt, frames in prompts]
    assert answers[0].startswith("(") and answers[2].startswith("(")


@torch.no_grad()
def test_loglikelihood_scores_the_continuation_as_the_model_predicts_it(lm, direct, files):
    model, processor = direct
    lm.task_dict = {"local_caption": {"test": [{"video": str(files["video"])}]}}
    # The model's next-token distribution after the prompt (up to "ASSISTANT:"; its trailing space starts the answer).
    prompt = render_prompt(processor, BenchmarkPrompt("Describe it.", "Describe it.")).rstrip()
    inputs = processor(text=prompt, videos=str(files["video"]), num_frames=16, pooling_prompt="Describe it.")
    log_probs = model(**inputs).logits[0, -1].log_softmax(-1)
    # The two most likely tokens that a continuation written after a space turns into (as one token: "▁From" is, a
    # piece inside a word is not); the first is the greedy choice when it is the most likely token of all.
    ranked = log_probs.argsort(descending=True).tolist()
    context_ids = processor.tokenizer(prompt).input_ids
    single = (t for t in ranked if processor.tokenizer(prompt + " " + processor.decode([t])).input_ids == context_ids + [t])
    best, second = next(single), next(single)
    continuations = [processor.decode([best]), processor.decode([second])]

    results = lm.loglikelihood([
        request("loglikelihood", ("Describe it.", text, doc_video, 0, "local_caption", "test"), "local_caption", 0)
        for text in continuations
    ])
    assert [greedy for _, greedy in results] == [best == ranked[0], False]
    assert [score for score, _ in results] == pytest.approx([log_probs[best].item(), log_probs[second].item()], abs=1e-4)


SRT = """1
00:00:00,000 --> 00:00:00,500
<font color="white" size=".72c">Here comes the ball.</font>

2
00:00:01,000 --> 00:00:01,050
<font color="white" size=".72c">Between two sampled frames.</font>
"""


def test_videomme_with_subtitles_asks_with_those_of_the_sampled_frames(lm, files, tmp_path, processor_calls, monkeypatch):
    doc = {"video": str(files["video"]), "videoID": "ball", "duration": "short", "question": "How many balls?",
           "options": ["A. One.", "B. Two."], "answer": "A"}
    lm.task_dict = {"videomme_w_subtitle": {"test": [doc]}}
    ask = request("generate_until", ("task text", dict(GREEDY), doc_video, 0, "videomme_w_subtitle", "test"),
                  "videomme_w_subtitle", 0)
    with pytest.raises(ValueError, match="subtitles_dir"):
        lm.generate_until([ask])
    (tmp_path / "ball.srt").write_text(SRT)
    monkeypatch.setattr(lm, "subtitles_dir", str(tmp_path))
    lm.generate_until([ask])
    # 32 frames of the 40 (10 fps): frames 0-4 show the first subtitle; the second spans no frame ([10, 10)).
    expected = videomme_prompt(doc["question"], doc["options"], subtitles="Here comes the ball.")
    assert processor_calls[-1]["text"] == [render_prompt(lm.processor, expected)]
    assert len(processor_calls[-1]["videos"][0]) == 32


def test_generate_until_multi_round_asks_each_round_the_task_gives(lm, direct, files):
    lm.task_dict = {"local_rounds": {"test": [{"video": str(files["video"])}]}}
    rounds = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        rounds.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 1:
            return [doc["video"]], "And then?", False, previous_output, {"asked": 1}
        return None, None, True, previous_output, previous_round_info

    answers = lm.generate_until_multi_round([
        request("generate_until_multi_round",
                ("What happens?", dict(GREEDY), doc_video, doc_to_text, 0, "local_rounds", "test"), "local_rounds", 0)
    ])
    first = direct_answer(direct, BenchmarkPrompt("What happens?", "What happens?"), files["video"], 16)
    second = direct_answer(direct, BenchmarkPrompt("And then?", "And then?"), files["video"], 16)
    assert answers == [[first, second]]
    assert rounds == [(1, [first], None), (2, [first, second], {"asked": 1})]


def test_generation_kwargs_become_generate_arguments():
    greedy = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    assert generation_options(greedy) == {"do_sample": False, "num_beams": 1, "max_new_tokens": 16}
    assert generation_options({"temperature": 0.7, "top_p": 0.9}) == {
        "do_sample": True, "num_beams": 1, "temperature": 0.7, "top_p": 0.9
    }
    assert cut_at_stop("A) red.\nB) blue", ["\n", "ASSISTANT:"]) == "A) red."
    assert cut_at_stop("A) red.", "). ") == "A) red." and cut_at_stop("A) red", None) == "A) red"


LOCAL_TASK = """
task: mvbench_local_sample
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_visual: !function local_task.doc_to_visual
doc_to_text: !function local_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function local_task.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
LOCAL_TASK_CODE = """
from ppllava_hf.evaluation.prompts import mvbench_is_correct


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(mvbench_is_correct(results[0], doc["candidates"], doc["answer"]))}
"""


def test_lmms_eval_cli_runs_a_local_task_and_writes_its_results(files, tmp_path):
    # Three MVBench-style questions about the clip, a task named like MVBench's (so the model asks PPLLaVA's MVBench
    # prompt), scored with PPLLaVA's answer check; --limit 2 runs the first two. Nothing is downloaded.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    video = str(files["video"])
    questions = [
        {"video": video, "question": "What color is the ball?", "candidates": ["red", "blue"], "answer": "red"},
        {"video": video, "question": "Where does it go?", "candidates": ["left", "right"], "answer": "right"},
        {"video": video, "question": "Is it raining?", "candidates": ["yes", "no"], "answer": "no"},
    ]
    (tasks / "questions.json").write_text(json.dumps(questions))
    (tasks / "mvbench_local_sample.yaml").write_text(LOCAL_TASK.format(questions=tasks / "questions.json"))
    (tasks / "local_task.py").write_text(LOCAL_TASK_CODE)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "lmms_eval", "--model", "ppllava", "--model_args",
               f"pretrained={files['model']},num_frames=8,device=cpu", "--tasks", "mvbench_local_sample",
               "--include_path", str(tasks), "--limit", "2", "--batch_size", "2", "--output_path",
               str(tmp_path / "out"), "--log_samples"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    [results_file] = (tmp_path / "out").rglob("*_results.json")
    [samples_file] = (tmp_path / "out").rglob("*_samples_mvbench_local_sample.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [sample["doc_id"] for sample in samples] == [0, 1]
    assert all(str(sample["filtered_resps"]).startswith("(") for sample in samples)  # "(" + the answer
    accuracy = json.loads(results_file.read_text())["results"]["mvbench_local_sample"]["accuracy,none"]
    assert accuracy == pytest.approx(sum(sample["accuracy"] for sample in samples) / 2)


@pytest.mark.parametrize(
    "model_args, message",
    [("prompts=mine", "prompts must be one of"), ("batch_size=auto", "batch_size must be"), ("dtype=half8", "dtype must")],
)
def test_unusable_model_args_are_refused_with_the_fix(files, model_args, message):
    with pytest.raises(ValueError, match=message):
        PPLLaVALmmsEval.create_from_arg_string(f"pretrained={files['model']},{model_args}")


@pytest.mark.parametrize("num_frames", ["0", "-4", "2.5", "many"])
def test_a_frame_count_below_one_or_not_whole_is_refused_before_the_model_loads(files, monkeypatch, num_frames):
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=r"num_frames must be a whole number of at least 1 \(or left out for the "):
        PPLLaVALmmsEval.create_from_arg_string(f"pretrained={files['model']},num_frames={num_frames}")


@pytest.mark.parametrize("pretrained", ["{tmp}/no_such_model", "./no_such_model", "runs/2026/no_such_model"])
def test_an_absent_local_pretrained_folder_is_named_as_missing_without_the_hub(tmp_path, monkeypatch, pretrained):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: pytest.fail("Hub asked"))
    source = pretrained.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=rf"^pretrained={re.escape(source)} does not exist; pass a PPLLaVA model"):
        PPLLaVALmmsEval.create_from_arg_string(f"pretrained={source}")
