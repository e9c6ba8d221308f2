"""The embedded default: a tiny PPLLaVA trained on the synthetic ball world (`testing.synthetic_world`), shipped with the
package, and a short sample clip of that world, so that the examples and tests run the whole pipeline (decode →
processor → vision tower → prompt-guided pooling → generate) with no download, and get right answers.

It is a Vicuna-layout PPLLaVA (CLIP vision tower with a BT-Adapter, CLIP prompt encoder, Llama) of tiny shapes, trained
from scratch on CPU by `examples/train_embedded_default.py`: a contrastive stage that aligns the vision patches with the
prompt encoder, then SFT with `PPLLaVASFTTrainer`. It knows balls of six colours crossing a frame and nothing else; real
questions need converted checkpoints. It ships as an ordinary model folder (config, safetensors weights, processor) in
`ppllava_hf/testing/embedded_default_model/`, package data. Random-weight tiny models come from `testing.tiny`.
"""

from importlib import resources
from pathlib import Path

import numpy as np

from ..conversion.rules import non_finite_weights
from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from .synthetic_world import GRASS, SKY, Background, Ball, Clip
from .tiny import tiny_config


EMBEDDED_DEFAULT_FOLDER_NAME = "embedded_default_model"
EMBEDDED_DEFAULT_NUM_FRAMES = 16
EMBEDDED_DEFAULT_MAX_NEW_TOKENS = 32

# The sample clip: a red ball rolls from left to right across a meadow under a blue sky, in view from BALL_ENTERS to
# BALL_LEAVES seconds; before and after, the scene is empty. A question about the ball has a spatial answer (where it
# is in each frame) and a temporal one (when it is in view), which is what the relevance heatmap and timeline show.
BALL_ENTERS, BALL_LEAVES = 1.0, 3.0
SAMPLE_CLIP = Clip(
    seconds=4.0,
    fps=10,
    height=96,
    width=128,
    background=Background("meadow", (SKY, GRASS), horizon=0.6),
    balls=(Ball("red", "medium", "from left to right", BALL_ENTERS, BALL_LEAVES, lane=0.7),),
)
SAMPLE_QUESTION = "Where does the red ball go?"
SAMPLE_ANSWER = "From left to right."


def embedded_default_folder() -> Path:
    """The shipped model folder, inside the installed package."""
    return Path(str(resources.files(__package__) / EMBEDDED_DEFAULT_FOLDER_NAME))


def embedded_default_config() -> PPLLaVAConfig:
    """The embedded default's shapes: `tiny_config("vicuna")` with vocabularies of 500 LLM tokens (then `<image>`,
    `<video>`; 512 embedding rows) and 256 prompt tokens, room enough for the world's words to be whole tokens, and a
    4-layer Llama: a direction is where the ball's tokens are early against where they are late, a comparison that two
    layers do not learn on a CPU budget."""
    config = tiny_config("vicuna", vocab_size=512, image_token_id=500, video_token_id=501, prompt_vocab_size=256)
    config.text_config.num_hidden_layers = 4
    config.text_config.layer_types = ["full_attention"] * 4
    return config


def build_embedded_default(
    num_frames: int = EMBEDDED_DEFAULT_NUM_FRAMES, folder: str | Path | None = None
) -> tuple[PPLLaVAForConditionalGeneration, PPLLaVAProcessor]:
    """The trained embedded default (float32, eval mode) and its processor sampling `num_frames` frames per video, read
    from `folder` (default: the shipped one). A weight file that cannot be read (see `from_pretrained`), weights that do
    not fill the model exactly (missing, unexpected or reshaped keys) and weights that are NaN or infinite raise a
    `ValueError` naming the file or the tensors, instead of loading a model that answers wrongly."""
    folder = Path(folder or embedded_default_folder())
    rewrite = "write them again with `python examples/train_embedded_default.py --output-dir <that folder>`"
    model, loading = PPLLaVAForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, ignore_mismatched_sizes=True
    )
    problems = [f"{kind.replace('_', ' ')} {sorted(keys)}" for kind, keys in loading.items() if kind != "error_msgs" and keys]
    if problems:
        raise ValueError(f"The weights in {folder} do not fit the embedded default ({'; '.join(problems)}); {rewrite}.")
    non_finite = non_finite_weights(model.state_dict().items())
    if non_finite:
        raise ValueError(f"The weights in {folder} are NaN or infinite: {', '.join(non_finite)}; {rewrite}.")
    model.eval()
    model.generation_config.max_new_tokens = EMBEDDED_DEFAULT_MAX_NEW_TOKENS
    processor = PPLLaVAProcessor.from_pretrained(folder)
    processor.video_processor.num_frames = num_frames
    return model, processor


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
    """The sample clip's RGB frame `(96, 128, 3)` uint8 at `time` seconds."""
    return SAMPLE_CLIP.frame(time)


def write_sample_video(path: str | Path) -> Path:
    """Encode the sample clip (4 s at 10 fps, H.264 in the container of `path`'s suffix, a few kB) with PyAV and
    return `path`."""
    return SAMPLE_CLIP.write(path)


__all__ = [
    "BALL_ENTERS",
    "BALL_LEAVES",
    "EMBEDDED_DEFAULT_NUM_FRAMES",
    "SAMPLE_ANSWER",
    "SAMPLE_CLIP",
    "SAMPLE_QUESTION",
    "build_embedded_default",
    "embedded_default_config",
    "embedded_default_folder",
    "sample_frame",
    "save_embedded_default",
    "write_sample_video",
]
