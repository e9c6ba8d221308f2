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
is pooled under its own question. Videos sampled to --stream-min-frames frames or more (default 256) are streamed:
decoded and encoded a chunk at a time, in bounded memory.

Several processes (one per GPU, or CPU processes), each with its own copy of the model:

    torchrun --nproc_per_node 8 examples/batch_infer.py --input questions.jsonl --output answers.jsonl --model ...
    accelerate launch --num_processes 8 --multi_gpu examples/batch_infer.py ...

accelerate's `split_between_processes` gives each process its share of the rows still to answer; each writes its
answers to `<output>.rank<k>.part` as it goes, and the main process merges them into --output, in input order, at the
end (or, after an interruption, at the start of the next run).
"""

import argparse
import glob
import json
import time
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import gather_object
from ppllava_cli import (
    EMBEDDED_DEFAULT_NOTE,
    LoadedModel,
    add_model_arguments,
    answer_batch,
    check_below_folders,
    decode_or_error,
    load_model,
    streamed_video_or_error,
    resolve_device,
    video_question_prompt,
)
from tqdm import tqdm


PART_SUFFIX = ".rank{}.part"
UNREADABLE = "unreadable line"  # the key of a row read from a JSONL line that is not one: why not
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts"}


def read_rows(source: Path, question: str | None) -> list[dict]:
    """The rows to answer: one per video file of a folder, or one per line of a JSONL file."""
    if source.is_dir():
        if question is None:
            raise SystemExit("A folder of videos needs --question.")
        videos = sorted(path for path in source.iterdir() if path.suffix.lower() in VIDEO_SUFFIXES)
        return [{"id": path.name, "video": str(path), "question": question} for path in videos]
    if not source.is_file():
        raise SystemExit(f"error: --input {source} does not exist; pass a folder of videos or a JSONL file.")
    rows = []
    with source.open(errors="replace") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                rows.append(read_row(line, number, source, question))
    return rows


def read_row(line: str, number: int, source: Path, question: str | None) -> dict:
    """The row of JSONL line `number`; a line that is not a JSON object of the expected fields gives a row holding why
    (`UNREADABLE`, naming the line), recorded in the output as its error, like a video that cannot be read."""
    where = f"line {number} of {source}"
    try:
        row = json.loads(line)
    except ValueError as error:
        return {"id": number, UNREADABLE: f"{where} is not valid JSON ({error})"}
    if not isinstance(row, dict):
        kind = type(row).__name__
        return {"id": number, UNREADABLE: f'{where} is a JSON {kind}, not an object {{"video": ..., ...}}'}
    row.setdefault("id", number)
    if question is not None:
        row.setdefault("question", question)
    fields = (("id", (str, int), "string or a number"), ("video", str, "path"), ("question", str, "string"))
    wrong = [
        f"its {key} must be a {kind}"
        for key, types, kind in fields
        if key in row and (not isinstance(row[key], types) or isinstance(row[key], bool))
    ]
    if wrong:
        return {"id": number, UNREADABLE: f"{where}: {', '.join(wrong)}"}
    if "video" in row and not Path(row["video"]).is_absolute():
        row["video"] = str(source.parent / row["video"])
    return row


def check_output(output: Path, source: Path) -> None:
    """Refuse an --output that is a folder, lies below a file, is the input itself, or is a file that is not a JSONL of
    answer rows (an earlier run's): it would be read as finished rows, or written into."""
    if output.is_dir():
        raise SystemExit(f"error: --output {output} is a folder; give the path of a JSONL file of answers.")
    try:
        check_below_folders(output, "--output")
    except NotADirectoryError as error:
        raise SystemExit(f"error: {error}") from None
    if not output.exists():
        return
    if source.exists() and output.resolve() == source.resolve():
        raise SystemExit(f"error: --output {output} is the --input file; give another path for the answers.")
    for number, line in enumerate(output.read_bytes().splitlines(), 1):
        if line.strip() and not is_answer_row(line):
            raise SystemExit(
                f"error: --output {output} is not a JSONL file of answers (line {number} is not a row with an id and "
                "an answer or error); choose a new file, or the output of an earlier run to resume it."
            )


def is_answer_row(line: bytes) -> bool:
    """Whether `line` is a row this script writes: a JSON object with an `id` and an `answer` or an `error`."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and ("answer" in row or "error" in row)


def finished_ids(output: Path) -> set:
    """Ids already in `output`."""
    return {row["id"] for row in read_jsonl(output)} if output.exists() else set()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def part_path(output: Path, process_index: int) -> Path:
    """Where process `process_index` writes its answers until they are merged into `output`."""
    return output.with_name(output.name + PART_SUFFIX.format(process_index))


def merge_outputs(output: Path, rows: list[dict], drop_errors: bool = False) -> None:
    """Fold the part files of every process (`part_path`) into `output`, its rows in the order of the input `rows`
    (rows of ids no longer in the input keep their order after them); with `drop_errors`, rows that failed are
    removed."""
    parts = list(output.parent.glob(glob.escape(output.name) + PART_SUFFIX.format("*")))
    if not parts and not drop_errors:
        return
    results = [result for path in (output, *parts) if path.exists() for result in read_jsonl(path)]
    if drop_errors:
        results = [result for result in results if "error" not in result]
    position = {row["id"]: index for index, row in enumerate(rows)}
    results.sort(key=lambda result: position.get(result["id"], len(rows)))
    merged = output.with_name(f"{output.name}.merging")
    merged.write_text("".join(json.dumps(result) + "\n" for result in results))
    merged.replace(output)
    for path in parts:
        path.unlink()


def answer_rows(loaded: LoadedModel, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Output rows for one batch: a row whose video cannot be read gets its error, the others are answered together."""
    num_frames = args.num_frames or loaded.processor.video_processor.num_frames
    results, ready = {}, []
    for index, row in enumerate(rows):
        if UNREADABLE in row:
            results[index] = {"error": row[UNREADABLE]}
            continue
        if "video" not in row or "question" not in row:
            results[index] = {"error": "the row needs a 'video' and a 'question'"}
            continue
        times = (row.get("start_time"), row.get("end_time"))
        if loaded.streams(args, num_frames):  # a long video: decoded and encoded a chunk at a time by the model
            frames = streamed_video_or_error(row["video"], num_frames, *times)
        else:
            frames = decode_or_error(row["video"], num_frames, *times)
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
    # A video to stream comes as its file's Path: the processor samples its clip (start_time / end_time) itself.
    clips = {
        name: [row.get(name) if isinstance(frames, Path) else None for row, frames in group]
        for name in ("start_time", "end_time")
    } if any(isinstance(frames, Path) for _, frames in group) else {}
    try:
        answers = answer_batch(
            loaded,
            [video_question_prompt(loaded.processor, row["question"]) for row, _ in group],
            [str(frames) if isinstance(frames, Path) else frames for _, frames in group],
            [row["question"] for row, _ in group],
            args.max_new_tokens,
            **loaded.processor_kwargs(args),
            **clips,
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
    # One process, or one of several started by torchrun / accelerate launch (CPU ones where there is no GPU).
    state = PartialState(cpu=resolve_device(args.device).type == "cpu")
    try:
        counts = run(args, state)
        state.wait_for_everyone()
        return counts
    finally:
        # A process that exits with the process group still up leaves its gloo/NCCL threads to the interpreter's
        # shutdown, which can abort it (SIGABRT) after every row is written; torchrun then fails the run.
        state.destroy_process_group()


def run(args: argparse.Namespace, state: PartialState) -> dict:
    """Answer the rows of `args` still missing from `args.output` in this process's share; returns the counts of all
    processes."""
    if args.device == "auto":
        args.device = str(state.device)
    check_output(args.output, args.input)
    rows = read_rows(args.input, args.question)
    if state.is_main_process:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        merge_outputs(args.output, rows, drop_errors=args.retry_errors)
    state.wait_for_everyone()
    done = finished_ids(args.output)
    todo = [row for row in rows if row["id"] not in done]
    state.print(f"{len(rows)} rows, {len(rows) - len(todo)} already in {args.output}, {len(todo)} to answer"
                + (f" over {state.num_processes} processes" if state.num_processes > 1 else ""))
    start = time.perf_counter()
    with state.split_between_processes(todo) as share:
        counts = answer_share(share, part_path(args.output, state.process_index), args, state)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_outputs(args.output, rows)
    counts = {key: sum(process[key] for process in gather_object([counts])) for key in counts}
    counts["skipped"] = len(rows) - len(todo)
    if todo:
        seconds = time.perf_counter() - start
        state.print(f"{counts['answered']} answered, {counts['errors']} errors in {seconds:.1f} s "
                    f"({len(todo) / seconds:.2f} rows/s); wrote {args.output}")
    return counts


def answer_share(rows: list[dict], part: Path, args: argparse.Namespace, state: PartialState) -> dict:
    """Answer this process's `rows` in batches, appending each result to `part` as it comes; returns the counts. A
    process with no rows loads no model."""
    counts = {"answered": 0, "errors": 0}
    if not rows:
        return counts
    loaded = load_model(args)
    if loaded.is_embedded_default:
        state.print(EMBEDDED_DEFAULT_NOTE)
    with part.open("a") as output, tqdm(total=len(rows), unit="row", disable=not state.is_main_process) as progress:
        for first in range(0, len(rows), args.batch_size):
            for result in answer_rows(loaded, rows[first : first + args.batch_size], args):
                output.write(json.dumps(result) + "\n")
                counts["errors" if "error" in result else "answered"] += 1
            output.flush()
            progress.update(min(args.batch_size, len(rows) - first))
            progress.set_postfix(errors=counts["errors"])
    return counts


if __name__ == "__main__":
    main()
