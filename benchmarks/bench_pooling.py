"""Prompt-guided pooling at PPLLaVA's real shape: ours vs the original's unfold formulation vs avg_pool3d (the floor).

    python benchmarks/bench_pooling.py [--quick] [--device cuda] [--hidden 1024]

One video of 32 frames x 24 x 24 patches, hidden 4096, pooled with (2, 3, 3) windows to 16 x 8 x 8 = 1024 tokens,
in float32 and bfloat16. `avg_pool3d` does less work (no weights) and gets its own best layout, a contiguous
(N, C, D, H, W) tensor prepared outside the timing: it is the floor.
"""

import torch
import torch.nn.functional as F
from measure import (
    benchmark_arguments,
    describe_machine,
    mib,
    peak_memory,
    print_table,
    ratio,
    report_target,
    setup,
    time_interleaved,
)

from ppllava_hf.models.ppllava.modeling_ppllava import prompt_guided_pool
from ppllava_hf.models.ppllava.token_counts_ppllava import PoolingPlan, plan_pooling


TEMPERATURE = 0.01
OURS, UNFOLD, FLOOR = "ours (prompt_guided_pool)", "unfold (original formulation)", "avg_pool3d (floor)"


def unfold_pool(features: torch.Tensor, relevance: torch.Tensor, plan: PoolingPlan, temperature: float) -> torch.Tensor:
    """Baseline with the original's formulation (`weighted_adaptive_avg_pool3d_unfold`): unfold the features and the
    relevance into windows, make them contiguous, softmax each window, multiply and sum. Arithmetic in the features'
    dtype, as the original's."""
    (kernel_d, kernel_h, kernel_w), (stride_d, stride_h, stride_w) = plan.kernel, plan.stride
    batch, dim = features.shape[0], features.shape[-1]
    channels_first = features.permute(0, 4, 1, 2, 3)
    windows = channels_first.unfold(2, kernel_d, stride_d).unfold(3, kernel_h, stride_h).unfold(4, kernel_w, stride_w)
    windows = windows.contiguous().view(batch, dim, *plan.output_size, -1)
    weights = relevance.to(features.dtype).unfold(1, kernel_d, stride_d).unfold(2, kernel_h, stride_h)
    weights = weights.unfold(3, kernel_w, stride_w).contiguous().view(batch, *plan.output_size, -1)
    weights = F.softmax(weights / temperature, dim=-1)
    return (windows * weights.unsqueeze(1)).sum(dim=-1).permute(0, 2, 3, 4, 1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def avg_pool3d_supported(dtype: torch.dtype, device: torch.device) -> bool:
    try:
        F.avg_pool3d(torch.zeros(1, 1, 2, 2, 2, dtype=dtype, device=device), 2)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def measure_ops(dtype: torch.dtype, shape: tuple, plan: PoolingPlan, repeats: int, device: torch.device) -> dict:
    """Median time, spread and peak extra memory of each op on one random input of `dtype`."""
    features = torch.randn(shape, device=device).to(dtype)
    relevance = torch.softmax(torch.randn(shape[:4], device=device).flatten(1), dim=-1).view(shape[:4])
    cases = {
        OURS: lambda: prompt_guided_pool(features, relevance, plan, TEMPERATURE),
        UNFOLD: lambda: unfold_pool(features, relevance, plan, TEMPERATURE),
    }
    if avg_pool3d_supported(dtype, device):
        channels_first = features.permute(0, 4, 1, 2, 3).contiguous()
        cases[FLOOR] = lambda: F.avg_pool3d(channels_first, plan.kernel, plan.stride)
    with torch.no_grad():
        timings = time_interleaved(cases, repeats, device)
        memory = {name: peak_memory(run, device).extra for name, run in cases.items()}
        ours, unfold = cases[OURS]().float(), cases[UNFOLD]().float()
    difference = float((ours - unfold).norm() / unfold.norm())
    return {"time": timings, "memory": memory, "difference": difference}


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0], default_repeats=5)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--grid", type=int, default=24, help="patches per side")
    parser.add_argument("--hidden", type=int, default=4096, help="channels (4096 = the LLM width PPLLaVA pools at)")
    args = parser.parse_args()
    device = setup(args)
    shape = (1, args.frames, args.grid, args.grid, args.hidden)
    plan = plan_pooling(shape[1:4], kernel=(2, 3, 3), stride=(2, 3, 3))
    print(f"Pooling {shape} -> {plan.output_size} x {args.hidden}, {describe_machine(device)}, {args.repeats} repeats\n")

    results = {dtype: measure_ops(dtype, shape, plan, args.repeats, device) for dtype in (torch.float32, torch.bfloat16)}
    # Without a bfloat16 avg_pool3d kernel (CPU), the float32 floor stands in: it reads twice the bytes.
    floors = {dtype: result["time"].get(FLOOR, results[torch.float32]["time"][FLOOR]) for dtype, result in results.items()}
    rows = []
    for dtype, result in results.items():
        timings, memory = result["time"], result["memory"]
        for name in timings:
            rows.append([
                dtype_name(dtype), name, timings[name].formatted(), mib(memory[name]),
                ratio(timings[name].median, timings[UNFOLD].median), ratio(memory[name], memory[UNFOLD]),
                ratio(timings[name].median, floors[dtype].median),
            ])
    print_table(
        ["dtype", "op", "median ms (min-max)", "peak extra MiB", "time / unfold", "memory / unfold", "time / avg_pool3d"],
        rows,
    )
    if any(FLOOR not in result["time"] for result in results.values()):
        print("\navg_pool3d has no bfloat16 kernel here: bfloat16 rows compare with the float32 avg_pool3d.")
    print("\nTargets:")
    for dtype, result in results.items():
        name = dtype_name(dtype)
        timings, memory = result["time"], result["memory"]
        print(f"- {name}: relative difference between ours and unfold {result['difference']:.1e}")
        report_target(f"{name} speed-up over unfold", timings[UNFOLD].median / timings[OURS].median, 3, at_least=True)
        report_target(f"{name} peak extra memory / unfold's", memory[OURS] / memory[UNFOLD], 0.5)
        report_target(f"{name} time / avg_pool3d's", timings[OURS].median / floors[dtype].median, 2)


if __name__ == "__main__":
    main()
