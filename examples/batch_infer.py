"""Answer questions about many videos with PPLLaVA, in batches, into a JSONL file that a rerun resumes.

    # every video of a folder, one question for all:
    python examples/batch_infer.py --input videos/ --question "Describe the video." --output answers.jsonl
    # one question per row: {"id": ..., "video": "a.mp4", "question": "...", "start_time": 3.0, "end_time": 9.5}
    python examples/batch_infer.py --input questions.jsonl --output answers.jsonl --model path/to/ppllava --batch-size 8

Input rows: `video` (a path, relative to the JSONL file's folder unless absolute) and `question` (default: --question);
optional `id` (default: the file name in a folder, the 1-based line number in a JSONL file) and `start_time` /
`end_time` in seconds. Output rows: `id`, `video`, `question` and either `answer` or `error`.

Resuming: rows whose id is already in --output are skipped, so an interrupted run continues where it stopped;
--retry-errors first removes the rows that failed, to run them again. A row that fails (missing or corrupt video, ...)
is written with its error and the run goes on. Each batch is padded on the left and generated in one call; each video
is pooled under its own question.
"""

import argparse
import json
import time
from pathlib import Path

from ppllava_cli import (
    EMBEDDED_DEFAULT_NOTE,
    LoadedModel,
    add_model_arguments,
    answer_batch,
    decode_or_error,
    load_model,
    video_question_prompt,
)
from tqdm import tqdm


VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts"}


def read_rows(source: Path, question: str | None) -> list[dict]:
    """The rows to answer: one per video file of a folder, or one per line of a JSONL file."""
    if source.is_dir():
        if question is None:
            raise SystemExit("A folder of videos needs --question.")
        videos = sorted(path for path in source.iterdir() if path.suffix.lower() in VIDEO_SUFFIXES)
        return [{"id": path.name, "video": str(path), "question": question} for path in videos]
    rows = []
    with source.open() as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            row.setdefault("id", number)
            if question is not None:
                row.setdefault("question", question)
            if "video" in row and not Path(row["video"]).is_absolute():
                row["video"] = str(source.parent / row["video"])
            rows.append(row)
    return rows


def finished_ids(output: Path, retry_errors: bool) -> set:
    """Ids already in `output`; with `retry_errors`, rows that failed are first removed from the file."""
    if not output.exists():
        return set()
    rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    if retry_errors:
        rows = [row for row in rows if "error" not in row]
        output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {row["id"] for row in rows}


def answer_rows(loaded: LoadedModel, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Output rows for one batch: a row whose video cannot be read gets its error, the others are answered together."""
    num_frames = args.num_frames or loaded.processor.video_processor.num_frames
    results, ready = {}, []
    for index, row in enumerate(rows):
        if "video" not in row or "question" not in row:
            results[index] = {"error": "the row needs a 'video' and a 'question'"}
            continue
        frames = decode_or_error(row["video"], num_frames, row.get("start_time"), row.get("end_time"))
        if isinstance(frames, str):
            results[index] = {"error": frames}
        else:
            ready.append((index, row, frames))
    if ready:
        results.update(zip([index for index, _, _ in ready], answer_group(loaded, [item[1:] for item in ready], args)))
    return [{key: row.get(key) for key in ("id", "video", "question")} | results[index] for index, row in enumerate(rows)]


def answer_group(loaded: LoadedModel, group: list[tuple[dict, object]], args: argparse.Namespace) -> list[dict]:
    """`{"answer": ...}` for each (row, frames) of `group`, generated in one batch; if the batch fails, its rows are
    answered one by one so that a single bad row only costs its own answer (`{"error": ...}`)."""
    try:
        answers = answer_batch(
            loaded,
            [video_question_prompt(loaded.processor, row["question"]) for row, _ in group],
            [frames for _, frames in group],
            [row["question"] for row, _ in group],
            args.max_new_tokens,
            **loaded.processor_kwargs(args),
        )
    except Exception as error:  # noqa: BLE001  (recorded in the output; the run goes on)
        if len(group) == 1:
            return [{"error": f"{type(error).__name__}: {error}"}]
        return [result for item in group for result in answer_group(loaded, [item], args)]
    return [{"answer": answer.strip()} for answer in answers]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--input", required=True, type=Path, help="A folder of videos or a JSONL file of questions.")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file of answers (appended to, resumable).")
    parser.add_argument("--question", help="Question for every video of a folder, or for JSONL rows without one.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--retry-errors", action="store_true", help="Run the rows that failed before again.")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = read_rows(args.input, args.question)
    done = finished_ids(args.output, args.retry_errors)
    todo = [row for row in rows if row["id"] not in done]
    print(f"{len(rows)} rows, {len(rows) - len(todo)} already in {args.output}, {len(todo)} to answer")
    counts = {"answered": 0, "errors": 0, "skipped": len(rows) - len(todo)}
    if not todo:
        return counts
    loaded = load_model(args)
    if loaded.is_embedded_default:
        print(EMBEDDED_DEFAULT_NOTE)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with args.output.open("a") as output, tqdm(total=len(todo), unit="row") as progress:
        for first in range(0, len(todo), args.batch_size):
            for result in answer_rows(loaded, todo[first : first + args.batch_size], args):
                output.write(json.dumps(result) + "\n")
                counts["errors" if "error" in result else "answered"] += 1
            output.flush()
            progress.update(min(args.batch_size, len(todo) - first))
            progress.set_postfix(errors=counts["errors"])
    seconds = time.perf_counter() - start
    print(f"{counts['answered']} answered, {counts['errors']} errors in {seconds:.1f} s "
          f"({len(todo) / seconds:.2f} rows/s); wrote {args.output}")
    return counts


if __name__ == "__main__":
    main()
