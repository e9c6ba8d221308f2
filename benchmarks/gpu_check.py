"""The accelerator check's own table: environment, precision (float32 vs bfloat16 vs float16 per attention kernel) and
throughput at equal memory (PPLLaVA vs LLaVA-NeXT-Video), as markdown on stdout.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--budget-gib 16]

Run by `gpu_check.sh`, which also runs the other benchmarks. Models: the 7B models scaled down (`scaled_models.py`,
random weights, fixed seeds).

- Precision: for each attention implementation (sdpa, eager, and flash_attention_2 when `flash_attn` imports), the
  float32 model is cast to bfloat16 and float16; the logits of one forward over a 32-frame video are compared with the
  float32 model's with the same attention (largest difference, relative to the largest float32 logit) and the 16
  greedy tokens with float32's.
- Throughput at equal memory: the largest batch of 32-frame videos each model generates 32 tokens for within
  `--budget-gib` (weights, inputs and the generation's peak: measured at batches 1 and 2, extrapolated, then checked
  at the predicted batch and lowered until it fits), and the tokens per second at that batch.
"""

import argparse
import importlib.metadata
import platform
import sys
import time

import torch
from measure import MIB, module_bytes, peak_memory, print_table, synchronize, tensor_bytes
from scaled_models import (
    Scale,
    build_llava_next_video,
    build_ppllava,
    llava_next_video_inputs,
    ppllava_inputs,
    random_video,
)


GIB = 1024 * MIB
PRECISION_TOKENS, THROUGHPUT_TOKENS = 16, 32
DTYPES = ("float32", "bfloat16", "float16")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_rows(device: torch.device) -> list[list[str]]:
    """What ran the check: machine, Python, torch and its CUDA, and the packages PPLLaVA uses."""
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    rows = [
        ["device", accelerator], ["python", sys.version.split()[0]], ["torch", torch.__version__],
        ["torch CUDA", str(torch.version.cuda)],
    ]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        rows.append(["GPU memory", f"{total / GIB:.1f} GiB ({free / GIB:.1f} free)"])
    packages = ("transformers", "accelerate", "peft", "av", "bitsandbytes", "flash-attn", "trl")
    return rows + [[name, package_version(name)] for name in packages]


def attention_implementations() -> list[str]:
    """sdpa and eager, and flash_attention_2 when its package imports."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return ["sdpa", "eager"]
    return ["sdpa", "eager", "flash_attention_2"]


def precision_rows(scale: Scale, device: torch.device, frames: int) -> list[list[str]]:
    """Per attention implementation and dtype: logits against float32 (same attention) and greedy tokens equal?"""
    rows = []
    for attention in attention_implementations():
        reference = None
        for name in DTYPES:
            dtype = getattr(torch, name)
            try:
                model = build_ppllava(scale, vision_chunk_frames=8)
                model.set_attn_implementation(attention)
                model.to(device, dtype)
                inputs = {
                    key: value.to(device) if isinstance(value, torch.Tensor) else value
                    for key, value in ppllava_inputs(model, random_video(frames)).items()
                }
                inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
                with torch.no_grad():
                    logits = model(**inputs).logits.float()
                    tokens = model.generate(**inputs, max_new_tokens=PRECISION_TOKENS, do_sample=False)
            except Exception as error:  # noqa: BLE001  (a kernel or dtype this machine lacks is a result too)
                rows.append([attention, name, f"{type(error).__name__}: {str(error)[:80]}", "-"])
                continue
            if reference is None:
                reference = (logits, tokens)
                rows.append([attention, name, "reference", "reference"])
                continue
            difference = float((logits - reference[0]).abs().max() / reference[0].abs().max())
            rows.append([attention, name, f"{difference:.2e}", "yes" if torch.equal(tokens, reference[1]) else "no"])
            del model
    return rows


def batched(inputs: dict, batch: int) -> dict:
    """`inputs` of one sample repeated `batch` times."""
    return {
        key: value.expand(batch, *value.shape[1:]).contiguous() if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }


def memory_at(model, inputs: dict, batch: int, device: torch.device) -> int:
    """Weights + inputs + the generation's peak extra at `batch`, in bytes."""
    batch_inputs = batched(inputs, batch)
    with torch.no_grad():
        peak = peak_memory(lambda: model.generate(**batch_inputs, max_new_tokens=THROUGHPUT_TOKENS, do_sample=False), device)
    return module_bytes(model) + sum(tensor_bytes(v) for v in batch_inputs.values() if isinstance(v, torch.Tensor)) + peak.extra


def largest_batch(model, inputs: dict, budget: int, device: torch.device, cap: int) -> tuple[int, int]:
    """The largest batch (at most `cap`) whose `memory_at` fits `budget`, and its memory."""
    one, two = memory_at(model, inputs, 1, device), memory_at(model, inputs, 2, device)
    if one > budget:
        return 0, one
    per_sample = max(two - one, 1)
    batch = min(cap, max(1, int((budget - one) // per_sample) + 1))
    while batch > 1:
        used = memory_at(model, inputs, batch, device)
        if used <= budget:
            return batch, used
        batch = max(1, int(batch * budget / used))
    return 1, one


def throughput_rows(scale: Scale, device: torch.device, dtype: torch.dtype, frames: int, budget: int, cap: int):
    """PPLLaVA and LLaVA-NeXT-Video: largest batch within `budget` and its tokens per second."""
    rows, rates = [], {}
    models = {
        "PPLLaVA": (lambda: build_ppllava(scale, vision_chunk_frames=8), ppllava_inputs),
        "LLaVA-NeXT-Video": (lambda: build_llava_next_video(scale), llava_next_video_inputs),
    }
    for name, (build, make_inputs) in models.items():
        model = build().to(device, dtype)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make_inputs(model, random_video(frames)).items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
        batch, used = largest_batch(model, inputs, budget, device, cap)
        if batch == 0:
            rows.append([name, "0", f"{used / GIB:.2f}", "-", "-"])
            continue
        batch_inputs = batched(inputs, batch)
        with torch.no_grad():
            model.generate(**batched(inputs, 1), max_new_tokens=2, do_sample=False)  # warm up
            synchronize(device)
            start = time.perf_counter()
            model.generate(
                **batch_inputs, max_new_tokens=THROUGHPUT_TOKENS, min_new_tokens=THROUGHPUT_TOKENS, do_sample=False
            )
            synchronize(device)
        seconds = time.perf_counter() - start
        rates[name] = batch * THROUGHPUT_TOKENS / seconds
        rows.append([name, str(batch), f"{used / GIB:.2f}", f"{seconds:.2f}", f"{rates[name]:.1f}"])
        del model, inputs, batch_inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(rates) == 2:
        rows.append(["PPLLaVA / LLaVA-NeXT-Video", "", "", "", f"{rates['PPLLaVA'] / rates['LLaVA-NeXT-Video']:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="8 frames, batches up to 3, 1 GiB: a CPU run of the code")
    parser.add_argument("--budget-gib", type=float, default=None, help="memory budget for the throughput (default 16)")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    scale = Scale(args.width, args.depth)
    frames = 8 if args.quick else 32
    budget = int((args.budget_gib or (1.0 if args.quick else 16.0)) * GIB)
    throughput_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    print("### Environment\n")
    print_table(["what", "version"], environment_rows(device))
    print(f"\n### Precision: {frames}-frame video, 7B sizes / (width {scale.width}, depth {scale.depth})\n")
    print_table(
        ["attention", "dtype", "max abs(logits - float32) / max abs(float32)", f"{PRECISION_TOKENS} greedy tokens = float32"],
        precision_rows(scale, device, frames),
    )
    print(
        f"\n### Throughput at equal memory: {frames}-frame videos, {THROUGHPUT_TOKENS} new tokens, {throughput_dtype}, "
        f"budget {budget / GIB:g} GiB\n"
    )
    print_table(
        ["model", "largest batch", "memory GiB", "generate s", "tokens/s"],
        throughput_rows(scale, device, throughput_dtype, frames, budget, cap=3 if args.quick else 256),
    )


if __name__ == "__main__":
    main()
