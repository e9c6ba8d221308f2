"""Chat with PPLLaVA about a video or an image in the terminal; answers stream token by token.

    python examples/chat.py --video clip.mp4 --model path/to/converted/ppllava
    python examples/chat.py --message "What happens?" --message "And then?"      # embedded default, sample clip

Type a message and press Enter; an empty line, /exit or Ctrl-D ends the chat. Messages can also come from --message
(repeat it) or from piped stdin, one per line.

Which prompt pools the video: PPLLaVA keeps the visual tokens that match a prompt, so every question re-encodes the
video (or image) and pools it under that question: each answer sees the tokens its own question selects.
--reuse-first-question-tokens is the fast path that trades this away: the media is encoded once, pooled under the FIRST
question, and those tokens serve every later turn (follow-ups cost only the language model, but are answered from what
the first question selected).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from ppllava_cli import EMBEDDED_DEFAULT_NOTE, LoadedModel, add_model_arguments, load_model, streamed_video_or_error
from transformers import TextStreamer

from ppllava_hf import decode_video
from ppllava_hf.testing.embedded_default import write_sample_video


class VisualChat:
    """A multi-turn conversation about one video or image, pooled under each new question (or, opted in, under the
    first question only).

    Args:
        loaded: the model and processor.
        media: `{"type": "video", "video": frames}` or `{"type": "image", "image": PIL image}`: a chat content block,
            already decoded so that later turns do not read the file again (or `{"type": "video", "path": ...}`).
        processor_kwargs: per-call processor options (e.g. `max_visual_tokens`).
        max_new_tokens: answer length limit.
        reuse_first_question_tokens: encode the media once and answer every turn from the tokens pooled under the
            first question (faster follow-ups, but they no longer see what their own question selects).

    After each `ask`, `inputs` and `encoded` hold that turn's processor outputs and visual encoding.
    """

    def __init__(self, loaded: LoadedModel, media: dict, processor_kwargs: dict, max_new_tokens: int,
                 reuse_first_question_tokens: bool = False):
        self.model, self.processor = loaded.model, loaded.processor
        self.media = media
        self.processor_kwargs = processor_kwargs
        self.max_new_tokens = max_new_tokens
        self.reuse_first_question_tokens = reuse_first_question_tokens
        self.messages: list[dict] = []
        self.inputs = None
        self.encoded = None

    @torch.no_grad()
    def ask(self, text: str, streamer: TextStreamer | None = None) -> str:
        """Answer `text` given the conversation so far (streamed to `streamer` as it is generated)."""
        content = [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": [self.media, *content] if not self.messages else content})
        inputs = self.processor.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=True, return_dict=True,
            processor_kwargs=self.processor_kwargs,
        ).to(self.model.device, dtype=self.model.dtype)
        self.inputs = inputs
        if self.encoded is None or not self.reuse_first_question_tokens:
            self.encoded = self.model.encode_multimodal(
                input_ids=inputs["input_ids"],
                pixel_values=inputs.get("pixel_values"),
                image_sizes=inputs.get("image_sizes"),
                pixel_values_videos=inputs.get("pixel_values_videos"),
                clip_input_ids=inputs["clip_input_ids"],
                clip_attention_mask=inputs["clip_attention_mask"],
                max_visual_tokens=self.processor_kwargs.get("max_visual_tokens"),
            )
        output = self.model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs=self.encoded,
            max_new_tokens=self.max_new_tokens, do_sample=False, streamer=streamer,
        )
        answer = self.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--video", help="Video file (default: the embedded default's sample clip).")
    media.add_argument("--image", help="Image file.")
    parser.add_argument("--message", action="append", help="A user message; repeat for more turns (else read stdin).")
    parser.add_argument(
        "--reuse-first-question-tokens", action="store_true",
        help="Encode the media once, pooled under the first question, and answer every later turn from those tokens: "
             "faster follow-ups, but they are answered from what the first question selected, not their own.",
    )
    add_model_arguments(parser)
    return parser.parse_args(argv)


def load_media(args: argparse.Namespace, loaded: LoadedModel, workdir: Path) -> dict:
    """The chat content block for --video / --image, decoded once (the sample clip when neither is given); a video
    sampled to --stream-min-frames frames or more is opened for streaming instead (its frames are read when encoded)."""
    if args.image:
        return {"type": "image", "image": Image.open(args.image).convert("RGB")}
    path = args.video or write_sample_video(workdir / "sample.mp4")
    num_frames = args.num_frames or loaded.processor.video_processor.num_frames
    if loaded.streams(args, num_frames):
        video = streamed_video_or_error(path, num_frames)
        if isinstance(video, str):
            raise SystemExit(video)
        if isinstance(video, Path):  # the processor opens it at each turn; the model reads it when it encodes
            return {"type": "video", "path": str(video)}
    frames, _ = decode_video(path, num_frames=num_frames)
    return {"type": "video", "video": frames}


def user_messages(args: argparse.Namespace):
    """The --message texts, or lines typed (or piped) on stdin until an empty line, /exit or end of input."""
    if args.message:
        for message in args.message:
            print(f"you> {message}")
            yield message
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline().strip()
        if not interactive and line:
            print(f"you> {line}")
        if line in ("", "/exit"):
            return
        yield line


def main(argv: list[str] | None = None) -> VisualChat:
    args = parse_args(argv)
    loaded = load_model(args)
    if loaded.is_embedded_default:
        print(f"[{EMBEDDED_DEFAULT_NOTE}]")
    with tempfile.TemporaryDirectory() as workdir:  # a streamed sample clip is read from it during the chat
        media = load_media(args, loaded, Path(workdir))
        chat = VisualChat(
            loaded, media, loaded.processor_kwargs(args), args.max_new_tokens, args.reuse_first_question_tokens
        )
        streamer = TextStreamer(loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        for message in user_messages(args):
            print("ppllava> ", end="", flush=True)
            chat.ask(message, streamer)
    return chat


if __name__ == "__main__":
    main()
