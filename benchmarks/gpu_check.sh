#!/usr/bin/env bash
# PPLLaVA's accelerator check: one run, one results file (about 8 minutes on one H100; nothing is downloaded).
#
#   benchmarks/gpu_check.sh                       # on the GPU machine: --device cuda
#   benchmarks/gpu_check.sh --device cpu --quick  # a CPU run of every step, to check the script itself
#
# Writes the markdown results to $GPU_CHECK_RESULT (default: $OUT/gpu_check.md when $OUT is set, else
# outputs/gpu_check.md) and prints them: the environment, float32 / bfloat16 / float16 logits per attention kernel,
# throughput at equal memory (PPLLaVA vs LLaVA-NeXT-Video), then bench_pooling.py, bench_end_to_end.py,
# bench_long_video.py and, when bitsandbytes is there, bench_quantized_load.py, each with --device.
#
# Packages the machine lacks travel as wheels in benchmarks/gpu_wheels/ (ignored by git; $GPU_WHEELS overrides it),
# installed offline (--no-index --no-deps) into a folder of their own that comes first on the path. Download them
# here, for the GPU image's Python 3.12, with the one command (about 48 MB: fits the 64 MiB a working tree carries):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d benchmarks/gpu_wheels transformers==5.23.0 av==19.0.2
#
#   transformers 5.23.0 (13.3 MB): the image has 5.17, below this package's floor (setup.cfg).
#   av 19.0.2 (35.0 MB): video decoding, for bench_long_video.py's streamed (from a file) column.
#   bitsandbytes 0.50.2 (43.1 MB, tag manylinux_2_24: add --platform manylinux_2_24_x86_64) for the 4-bit load:
#       with transformers it is 56.4 MB, without room for av; carry it instead of av if the 4-bit check matters more.
#   flash-attn: no wheel on PyPI (source only), so flash_attention_2 is reported as absent.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
device=cuda
quick=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=(--quick); shift ;;
        *) echo "gpu_check.sh: unknown option $1 (use --device DEVICE and --quick)" >&2; exit 2 ;;
    esac
done
wheels="${GPU_WHEELS:-$root/benchmarks/gpu_wheels}"
result="${GPU_CHECK_RESULT:-${OUT:-$root/outputs}/gpu_check.md}"
mkdir -p "$(dirname "$result")"
python="${PYTHON:-python3}"

site="$(mktemp -d)/site-packages"
shopt -s nullglob
carried=("$wheels"/*.whl)
if [ ${#carried[@]} -gt 0 ]; then
    "$python" -m pip install --quiet --no-deps --no-index --target "$site" "${carried[@]}" \
        || { echo "gpu_check.sh: installing the wheels of $wheels failed (see above)" >&2; exit 2; }
fi
export PYTHONPATH="$site:$root/src:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"

# What the package needs, said before anything runs: the transformers floor of setup.cfg, torch and accelerate.
floor="$(sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' "$root/setup.cfg" | head -n 1)"
"$python" - "$floor" "$wheels" <<'EOF' || exit 2
import importlib.metadata as metadata
import sys

floor, wheels = sys.argv[1], sys.argv[2]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
def numbers(text):
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())
problems = []
installed = version("transformers")
if installed is None or numbers(installed) < numbers(floor):
    problems.append(
        f"transformers {installed or 'is not installed'}: PPLLaVA needs >= {floor}. Put its wheel in {wheels} (pip "
        f"download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d {wheels} "
        f"transformers=={floor}.0)."
    )
for name in ("torch", "accelerate", "numpy", "safetensors", "tokenizers", "huggingface-hub"):
    if version(name) is None:
        problems.append(f"{name} is not installed: PPLLaVA and its benchmarks need it.")
if problems:
    print("gpu_check.sh cannot run:\n- " + "\n- ".join(problems), file=sys.stderr)
    sys.exit(1)
for name in ("av", "bitsandbytes", "flash-attn"):
    print(f"{name}: {version(name) or 'absent (its part of the check is skipped)'}")
EOF

has() { "$python" -c "import $1" 2>/dev/null; }
# Each step has its own time limit, so that the whole check stays within 8 minutes on one H100 (multiplied by
# $GPU_CHECK_SLOWDOWN, e.g. 10 for a CPU run).
step() {
    local limit=$(( $1 * ${GPU_CHECK_SLOWDOWN:-1} )) title="$2"; shift 2
    echo
    echo "## $title"
    echo
    (cd "$root/benchmarks" && timeout "$limit" "$python" "$@") 2>&1 | grep -v "was tested with transformers"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 124 ] && echo "(stopped after its limit of $limit s)"
    [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && echo "(failed with exit status $status)"
    return 0
}

{
    echo "# PPLLaVA accelerator check, $(date -u '+%Y-%m-%d %H:%M UTC'), --device $device ${quick[*]}"
    step 150 "Environment, precision, throughput at equal memory" gpu_check.py --device "$device" "${quick[@]}"
    step 45 "Prompt-guided pooling (bench_pooling.py)" bench_pooling.py --device "$device" "${quick[@]}"
    step 75 "End to end vs LLaVA-NeXT-Video (bench_end_to_end.py)" bench_end_to_end.py --device "$device" "${quick[@]}"
    step 150 "Long videos (bench_long_video.py)" bench_long_video.py --device "$device" "${quick[@]}"
    if has bitsandbytes; then
        step 60 "4-bit and 8-bit loads (bench_quantized_load.py)" bench_quantized_load.py --device "$device"
    else
        printf '\n## 4-bit and 8-bit loads\n\nskipped: bitsandbytes is not installed (see the wheel list in gpu_check.sh)\n'
    fi
} | tee "$result"
echo
echo "Results written to $result"
