"""The embedded default: a tiny random PPLLaVA and a short sample clip, both made locally, so that the examples and
tests run the whole pipeline (decode → processor → vision tower → prompt-guided pooling → generate) with no download.

The model's weights are random (fixed seed), so what it says is random too; its shapes, tokenizers, chat template and
code paths are those of a real Vicuna-layout PPLLaVA (CLIP vision tower with a BT-Adapter, CLIP prompt encoder, Llama).
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from .tiny import tiny_config, tiny_processor


EMBEDDED_DEFAULT_SEED = 0
EMBEDDED_DEFAULT_NUM_FRAMES = 16
EMBEDDED_DEFAULT_MAX_NEW_TOKENS = 32

# The sample clip: a red ball rolls from left to right across a meadow under a blue sky, in view from BALL_ENTERS to
# BALL_LEAVES seconds; before and after, the scene is empty. A question about the ball has a spatial answer (where it
# is in each frame) and a temporal one (when it is in view), which is what the relevance heatmap and timeline show.
SAMPLE_SECONDS = 4.0
SAMPLE_FPS = 10
SAMPLE_HEIGHT, SAMPLE_WIDTH = 96, 128
BALL_ENTERS, BALL_LEAVES = 1.0, 3.0
BALL_RADIUS = 10
SAMPLE_QUESTION = "Where does the red ball go?"


def build_embedded_default(
    num_frames: int = EMBEDDED_DEFAULT_NUM_FRAMES, seed: int = EMBEDDED_DEFAULT_SEED
) -> tuple[PPLLaVAForConditionalGeneration, PPLLaVAProcessor]:
    """The tiny Vicuna-layout PPLLaVA (random weights drawn with `seed`, in float32, eval mode) and its processor
    (tiny BPE tokenizers trained locally), sampling `num_frames` frames per video. The same seed gives the same
    weights, without touching the caller's random state."""
    config = tiny_config("vicuna")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PPLLaVAForConditionalGeneration(config).eval()
    model.generation_config.max_new_tokens = EMBEDDED_DEFAULT_MAX_NEW_TOKENS
    return model, tiny_processor(config, num_frames=num_frames)


def save_embedded_default(folder: str | Path, num_frames: int = EMBEDDED_DEFAULT_NUM_FRAMES) -> Path:
    """Write the embedded default as an ordinary model folder (config, safetensors weights, generation config,
    processor with both tokenizers), loadable with `AutoModelForImageTextToText` / `AutoProcessor` after
    `import ppllava_hf`."""
    folder = Path(folder)
    model, processor = build_embedded_default(num_frames)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def sample_frame(time: float) -> np.ndarray:
    """The sample clip's RGB frame `(SAMPLE_HEIGHT, SAMPLE_WIDTH, 3)` uint8 at `time` seconds."""
    frame = np.empty((SAMPLE_HEIGHT, SAMPLE_WIDTH, 3), np.uint8)
    horizon = SAMPLE_HEIGHT * 3 // 5
    frame[:horizon] = (110, 170, 230)
    frame[horizon:] = (70, 150, 60)
    if BALL_ENTERS <= time < BALL_LEAVES:
        progress = (time - BALL_ENTERS) / (BALL_LEAVES - BALL_ENTERS)
        centre_x = -BALL_RADIUS + progress * (SAMPLE_WIDTH + 2 * BALL_RADIUS)
        centre_y = horizon + BALL_RADIUS
        rows, cols = np.ogrid[:SAMPLE_HEIGHT, :SAMPLE_WIDTH]
        frame[(rows - centre_y) ** 2 + (cols - centre_x) ** 2 <= BALL_RADIUS**2] = (220, 30, 30)
    return frame


def write_sample_video(path: str | Path) -> Path:
    """Encode the sample clip (`SAMPLE_SECONDS` s at `SAMPLE_FPS` fps, H.264 in the container of `path`'s suffix,
    a few kB) with PyAV and return `path`."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(SAMPLE_FPS))
        stream.height, stream.width, stream.pix_fmt = SAMPLE_HEIGHT, SAMPLE_WIDTH, "yuv420p"
        frames = [
            av.VideoFrame.from_ndarray(sample_frame(index / SAMPLE_FPS), format="rgb24")
            for index in range(round(SAMPLE_SECONDS * SAMPLE_FPS))
        ]
        for frame in [*frames, None]:
            for packet in stream.encode(frame):
                container.mux(packet)
    return path


__all__ = ["build_embedded_default", "sample_frame", "save_embedded_default", "write_sample_video"]
