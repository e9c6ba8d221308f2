"""Memory of a 4-bit / 8-bit bitsandbytes load vs bfloat16: the scaled 7B PPLLaVA measured, the real 7B computed.

    python benchmarks/bench_quantized_load.py [--width 8 --depth 4] [--device cuda]

Measured: the scaled model (`scaled_models.py`, random weights) is saved in bfloat16, then loaded with
`from_pretrained` in bfloat16, in NF4 4-bit (bfloat16 compute: trl's `--load_in_4bit`) and in LLM.int8 8-bit. Only
the language model's linear layers are quantized (the model class keeps the vision tower, BT-Adapter, prompt
encoder, alignment, projector and lm_head in bfloat16). The weights of each load are measured by saving the loaded
model again (tensors plus quantization constants); on CUDA also the memory allocated after the load and its peak.
(On CPU the process resident set does not measure a load: bfloat16 weights stay memory-mapped from the file.)
Computed: the same sizes from parameter counts, at 2 bytes per bfloat16 weight, NF4's 0.5 byte per weight plus a
float32 scale per 64 weights, and int8's byte per weight plus a float32 scale per output row: for the scaled model (a
check of the arithmetic against the measurement) and for the real 7B sizes (counted on the meta device).
"""

import tempfile
from pathlib import Path

import torch
from measure import MIB, benchmark_arguments, describe_machine, mib, peak_memory, print_table, ratio, setup
from scaled_models import Scale, add_model_arguments, build_ppllava
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig


GIB = 1024 * MIB
LOADS = {
    "bfloat16": None,
    "4-bit NF4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "8-bit LLM.int8": BitsAndBytesConfig(load_in_8bit=True),
}


def parameter_split(model: torch.nn.Module) -> tuple[int, int, int]:
    """(weights of the language model's linear layers, their output rows, every other parameter)."""
    linear = [module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".language_model." in f".{name}."]
    quantized = sum(module.weight.numel() for module in linear)
    return quantized, sum(module.out_features for module in linear), sum(p.numel() for p in model.parameters()) - quantized


def computed_bytes(model: torch.nn.Module) -> dict[str, float]:
    """Weight bytes of each load from parameter counts (see the module docstring)."""
    quantized, rows, rest = parameter_split(model)
    return {"bfloat16": 2 * (rest + quantized), "4-bit NF4": 2 * rest + quantized * (0.5 + 4 / 64),
            "8-bit LLM.int8": 2 * rest + quantized + 4 * rows}


def saved_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0], default_repeats=1)
    add_model_arguments(parser, default_depth=4)
    args = parser.parse_args()
    device = setup(args)
    scale = Scale(args.width, args.depth)
    with torch.device("meta"):
        full = build_ppllava(Scale(1, 1))
    full_size, (quantized, _, rest) = computed_bytes(full), parameter_split(full)
    scaled = build_ppllava(scale).to(torch.bfloat16)
    computed = computed_bytes(scaled)
    print(f"PPLLaVA, 7B sizes / (width {scale.width}, depth {scale.depth}), {describe_machine(device)}")
    print(f"7B: {quantized / 1e9:.2f}B weights in the language model's linear layers, {rest / 1e9:.2f}B other parameters\n")

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scaled.save_pretrained(folder)
        del scaled
        for name, quantization in LOADS.items():
            loaded = {}

            def load():
                loaded["model"] = AutoModelForImageTextToText.from_pretrained(
                    folder, dtype=torch.bfloat16, quantization_config=quantization, device_map={"": str(device)}
                )

            cuda = []
            if device.type == "cuda":
                peak = peak_memory(load, device)
                cuda = [mib(torch.cuda.memory_allocated(device)), mib(peak.extra)]
            else:
                load()
            weights = saved_bytes(loaded.pop("model"))
            rows.append([name, weights, *cuda, computed[name], full_size[name]])
    headers = ["load", "weights MiB (measured)", *(["allocated MiB", "peak during load MiB"] if device.type == "cuda" else []),
               "computed MiB", "7B computed GiB", "measured / bfloat16", "7B / bfloat16"]
    print_table(headers, [[row[0], mib(row[1]), *row[2:-2], mib(row[-2]), f"{row[-1] / GIB:.2f}", ratio(row[1], rows[0][1]),
                           ratio(row[-1], rows[0][-1])] for row in rows])


if __name__ == "__main__":
    main()
