"""The web demo (examples/web_demo.py) as a Hugging Face Space: a Gradio Space runs `python app.py` in a checkout of
this repository with requirements.txt installed. It also runs locally (`python app.py --model ...`, same flags)."""

import sys
from pathlib import Path

# The checkout's package and examples, so that the Space needs no install of ppllava_hf itself.
ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "examples")]

import web_demo  # noqa: E402


app, args = web_demo.build_app(sys.argv[1:])
demo = app.blocks

if __name__ == "__main__":
    app.launch(args.host, args.port, args.max_upload_mb, args.concurrency)
