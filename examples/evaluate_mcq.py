"""Multiple-choice video QA accuracy (MVBench style) of a PPLLaVA model, per task type, with a results JSON.

    python examples/evaluate_mcq.py --data mvbench.json --video-root /data/MVBench/video --model path/to/ppllava \
        --output results.json --num-frames 32
    # the embedded default on a 6-question sample about the quickstart's clip
    python examples/evaluate_mcq.py --data examples/data/red_ball_mcq.json --video-root quickstart-output --output results.json

--data: a JSON list of {"video", "question", "candidates": [...], "answer": <one of the candidates>, "task_type"}, with
optional clip bounds "start" / "end" in seconds (MVBench's names). Video paths are relative to --video-root (default:
the JSON file's folder); a video may be a folder of frame images (MVBench's Episodic Reasoning), extracted at
--frame-folder-fps.

Prompt and scoring are those of PPLLaVA's published MVBench run (`ppllava_hf.evaluation.prompts`, the same the lmms-eval
model uses): the user turn is "Question: ...\\nOptions:\\n(A) ...\\n(B) ...\\nOnly give the best option." with no
system instruction, the answer is prefilled with "Best option:(", and the question with its options is the pooling
prompt. The prediction is "(" + the answer, checked as the original checks it (its first word names the correct
option); an unreadable video counts as wrong. Accuracy is reported per task type, over all questions, and as the mean
of the task accuracies (MVBench's headline number when tasks are equally large).
"""

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ppllava_cli import (
    EMBEDDED_DEFAULT_NOTE,
    LoadedModel,
    add_model_arguments,
    answer_batch,
    decode_or_error,
    load_model,
)
from tqdm import tqdm

from ppllava_hf.evaluation.prompts import (
    BenchmarkPrompt,
    mvbench_answer,
    mvbench_is_correct,
    mvbench_prompt,
    render_prompt,
)


def sample_prompt(sample: dict) -> BenchmarkPrompt:
    """PPLLaVA's MVBench prompt, prefill and pooling prompt for a question of --data."""
    return mvbench_prompt(sample["question"], sample["candidates"])


def mcq_prompt(processor, sample: dict) -> str:
    """The full prompt text of a question, in the model's chat template, ending with the prefill."""
    return render_prompt(processor, sample_prompt(sample))


def prediction_and_correct(sample: dict, generated: str | None) -> tuple[str | None, bool]:
    """The original's prediction for a generated answer (None without one) and whether it is correct."""
    if generated is None:
        return None, False
    prediction = sample_prompt(sample).prediction(generated)
    return prediction, mvbench_is_correct(prediction, sample["candidates"], sample["answer"])


def load_samples(path: Path) -> list[dict]:
    """The questions of a JSON list, checked: each needs video, question, candidates, an answer among them, task_type."""
    samples = json.loads(path.read_text())
    for number, sample in enumerate(samples):
        missing = {"video", "question", "candidates", "answer", "task_type"} - set(sample)
        if missing:
            raise ValueError(f"Question {number} of {path} lacks {sorted(missing)}.")
        if sample["answer"] not in sample["candidates"]:
            raise ValueError(f"Question {number} of {path}: the answer {sample['answer']!r} is not among its candidates.")
    return samples


def score(samples: Sequence[dict], generations: Sequence[str | None], errors: Sequence[str | None]) -> dict:
    """The results JSON: per-question records and accuracies (percent) per task type, overall and task mean."""
    records, counts = [], {}
    for sample, generated, error in zip(samples, generations, errors):
        prediction, correct = prediction_and_correct(sample, generated)
        truth = mvbench_answer(sample["candidates"], sample["answer"])
        record = {**sample, "prediction": prediction, "answer_option": truth, "correct": correct}
        if error is not None:
            record["error"] = error
        records.append(record)
        task = counts.setdefault(sample["task_type"], {"correct": 0, "total": 0})
        task["correct"] += record["correct"]
        task["total"] += 1
    accuracy = {task: 100 * count["correct"] / count["total"] for task, count in counts.items()}
    total = sum(count["total"] for count in counts.values())
    summary = {
        "overall": 100 * sum(count["correct"] for count in counts.values()) / total if total else 0.0,
        "task_mean": sum(accuracy.values()) / len(accuracy) if accuracy else 0.0,
    }
    return {"accuracy": {**accuracy, **summary}, "counts": counts, "errors": sum(e is not None for e in errors),
            "results": records}


AnswerFn = Callable[[list[dict]], list[tuple[str | None, str | None]]]


def evaluate(samples: Sequence[dict], answer: AnswerFn, batch_size: int = 4) -> dict:
    """Score `samples` with `answer`, which maps a batch of samples to (generated text or None, error or None) pairs,
    with a progress bar showing the running accuracy."""
    generations, errors, correct = [], [], 0
    with tqdm(total=len(samples), unit="question") as progress:
        for first in range(0, len(samples), batch_size):
            batch = list(samples[first : first + batch_size])
            for sample, (generated, error) in zip(batch, answer(batch)):
                generations.append(generated)
                errors.append(error)
                correct += prediction_and_correct(sample, generated)[1]
            progress.update(len(batch))
            progress.set_postfix(accuracy=f"{100 * correct / len(generations):.1f}%")
    return score(samples, generations, errors)


def model_answerer(loaded: LoadedModel, args: argparse.Namespace, video_root: Path) -> AnswerFn:
    """An `AnswerFn` that decodes each video (errors recorded per question) and generates a batch's answers together."""
    num_frames = args.num_frames or loaded.processor.video_processor.num_frames

    def answer(batch: list[dict]) -> list[tuple[str | None, str | None]]:
        decoded = [
            decode_or_error(video_root / sample["video"], num_frames, sample.get("start"), sample.get("end"),
                            folder_fps=args.frame_folder_fps)
            for sample in batch
        ]
        results = [(None, frames) if isinstance(frames, str) else None for frames in decoded]
        ready = [index for index, result in enumerate(results) if result is None]
        if ready:
            generated = answer_batch(
                loaded,
                [mcq_prompt(loaded.processor, batch[index]) for index in ready],
                [decoded[index] for index in ready],
                [sample_prompt(batch[index]).pooling_prompt for index in ready],
                args.max_new_tokens,
                **loaded.processor_kwargs(args),
            )
            for index, text in zip(ready, generated):
                results[index] = (text, None)
        return results

    return answer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", required=True, type=Path, help="JSON list of multiple-choice questions.")
    parser.add_argument("--video-root", type=Path, help="Folder the video paths are relative to (default: --data's).")
    parser.add_argument("--output", required=True, type=Path, help="Results JSON.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frame-folder-fps", type=float, default=3.0,
                        help="Rate the frames of frame-folder videos were extracted at, for start/end (MVBench's: 3).")
    add_model_arguments(parser)
    parser.set_defaults(max_new_tokens=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    samples = load_samples(args.data)
    loaded = load_model(args)
    if loaded.is_embedded_default:
        print(EMBEDDED_DEFAULT_NOTE)
    start = time.perf_counter()
    results = evaluate(samples, model_answerer(loaded, args, args.video_root or args.data.parent), args.batch_size)
    seconds = time.perf_counter() - start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    for task, count in results["counts"].items():
        print(f"{task:<30} {results['accuracy'][task]:6.2f}%  ({count['correct']}/{count['total']})")
    print(f"{'overall':<30} {results['accuracy']['overall']:6.2f}%  (task mean {results['accuracy']['task_mean']:.2f}%; "
          f"{results['errors']} unreadable videos counted wrong; {len(samples) / seconds:.2f} questions/s)")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
