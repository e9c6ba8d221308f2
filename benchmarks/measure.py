"""Measuring helpers shared by the benchmarks: wall time (median of interleaved repeats) and peak memory (real counters).

Timing: the cases of one table take turns, repeat after repeat, so that load from other processes on a shared machine
falls on all of them alike; each figure is the median, and the table shows the spread (min-max).

Memory: the peak number of bytes a call adds on top of what was in use when it started.
- CUDA: `torch.cuda.max_memory_allocated`, reset before the call.
- CPU (Linux): the peak resident set size of the process (`VmHWM`, reset through `/proc/self/clear_refs`) minus the
  resident set at the start. glibc first hands its free pages back (`malloc_trim`), so memory that the call reuses
  from the heap is counted again when it is touched.
"""

import argparse
import ctypes
import gc
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList


MIB = 1 << 20
T = TypeVar("T")


def benchmark_arguments(description: str, default_repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark takes; scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="reduced run (under 60 s on a 2-core CPU), same table")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed repeats per case (default {default_repeats}, 1 with --quick)"
    )
    parser.set_defaults(default_repeats=default_repeats)
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the common options; return the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else args.default_repeats
    torch.manual_seed(0)
    return torch.device(args.device)


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__} on {where}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall times in seconds of the repeats of one case."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def formatted(self, unit: str = "ms") -> str:
        """Median and, over several repeats, the spread: `12.3 (11.9-13.0)`."""
        scale, digits = {"ms": (1e3, 1), "s": (1.0, 2)}[unit]
        spread = f" ({min(self.samples) * scale:.{digits}f}-{max(self.samples) * scale:.{digits}f})"
        return f"{self.median * scale:.{digits}f}{spread if len(self.samples) > 1 else ''}"


def interleave(cases: dict[str, Callable[[], T]], repeats: int, warmup: int = 1) -> dict[str, list[T]]:
    """Results of `repeats` calls of each case, the cases taking turns; `warmup` rounds first, not kept."""
    results = {name: [] for name in cases}
    for round_index in range(warmup + repeats):
        for name, run in cases.items():
            result = run()
            if round_index >= warmup:
                results[name].append(result)
    return results


def time_interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, Timing]:
    """Wall time of each case, the cases taking turns (see `interleave`)."""

    def timed(run: Callable[[], object]) -> Callable[[], float]:
        def wall_time() -> float:
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            return time.perf_counter() - start

        return wall_time

    samples = interleave({name: timed(run) for name, run in cases.items()}, repeats, warmup)
    return {name: Timing(times) for name, times in samples.items()}


@dataclass
class GenerationTiming:
    """One greedy generation: seconds to the first token (prefill: vision, prompt, LLM), decode rate, total seconds."""

    prefill: float
    decode_tokens_per_second: float
    total: float


def timed_generate(model, inputs: dict, new_tokens: int, device: torch.device) -> GenerationTiming:
    """Greedy `model.generate` of exactly `new_tokens` tokens, timed at every token by a pass-through logits processor."""
    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            synchronize(device)
            stamps.append(time.perf_counter())
            return scores

    synchronize(device)
    start = time.perf_counter()
    model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        logits_processor=LogitsProcessorList([Stamp()]),
    )
    synchronize(device)
    total = time.perf_counter() - start
    decode_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return GenerationTiming(prefill=stamps[0] - start, decode_tokens_per_second=decode_rate, total=total)


def median_generation(timings: list[GenerationTiming]) -> tuple[Timing, float, Timing]:
    """Prefill and total as `Timing`s, and the median decode rate."""
    prefill = Timing([timing.prefill for timing in timings])
    total = Timing([timing.total for timing in timings])
    return prefill, statistics.median(timing.decode_tokens_per_second for timing in timings), total


@dataclass
class Peak:
    """Peak memory of one call: `total` in use at the peak (process resident set on CPU, allocated on CUDA) and
    `extra`, what the call added on top of what was in use when it started."""

    total: int
    extra: int


def peak_memory(run: Callable[[], object], device: torch.device) -> Peak:
    """Peak memory of `run()` (see the module docstring for the counters)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        total = torch.cuda.max_memory_allocated(device)
        return Peak(total=total, extra=total - start)
    if device.type != "cpu":
        raise NotImplementedError(f"No peak-memory counter for {device.type} devices.")
    _release_free_heap_pages()
    start = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    run()
    total = _status_bytes("VmHWM")
    return Peak(total=total, extra=total - start)


def _release_free_heap_pages() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed heap memory may be reused unseen, so peaks can read low
        pass


def _status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(tensor) for tensor in (*module.parameters(), *module.buffers()))


def mib(num_bytes: float) -> str:
    return f"{num_bytes / MIB:.1f}"


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table, ready to paste."""
    cells = [[str(cell) for cell in row] for row in (headers, *rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print("\n".join(lines))


def report_target(description: str, measured: float, limit: float, at_least: bool = False) -> bool:
    """Print whether a target holds: `measured <= limit`, or `>=` with `at_least`."""
    met = measured >= limit if at_least else measured <= limit
    print(f"- {description}: {measured:.2f} ({'>=' if at_least else '<='} {limit:g} targeted) -> {'met' if met else 'NOT met'}")
    return met
