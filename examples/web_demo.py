"""A web demo of PPLLaVA (Gradio): upload a video or an image, or pick an example clip, chat about it, and watch the
answer stream beside the relevance heatmap and the "when" timeline of the question.

    python examples/web_demo.py                          # embedded default, http://127.0.0.1:7860
    python examples/web_demo.py --model path/to/converted/ppllava --host 0.0.0.0 --port 7860

Every question re-encodes the video and pools it under that question (as examples/chat.py does), so each answer, its
heatmap and its timeline come from the tokens its own question selects. The page shows the token counts of each
turn; the token budget and the frames sampled can be changed between turns. Requests wait in a queue
(--concurrency at a time), uploads are capped at --max-upload-mb, and uploaded and generated files are deleted after an
hour. Needs the `demo` extra (`pip install -e ".[demo]"`); app.py at the repository root runs it as a Hugging Face
Space.
"""

import argparse
import atexit
import dataclasses
import io
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from chat import VisualChat  # noqa: E402
from PIL import Image  # noqa: E402
from ppllava_cli import EMBEDDED_DEFAULT_NOTE, LoadedModel, add_model_arguments, load_model  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from ppllava_hf import decode_video  # noqa: E402
from ppllava_hf.relevance import VideoRelevance  # noqa: E402
from ppllava_hf.testing.embedded_default import SAMPLE_CLIP  # noqa: E402
from ppllava_hf.testing.synthetic_world import Ball  # noqa: E402


logger = logging.getLogger("ppllava_hf.web_demo")

# A few clips of the embedded default's world, written when the app starts.
EXAMPLE_CLIPS = {
    "red ball, left to right": SAMPLE_CLIP,
    "blue ball, top to bottom": dataclasses.replace(
        SAMPLE_CLIP, balls=(Ball("blue", "large", "from top to bottom", 0.5, 3.0, lane=0.4),)
    ),
    "green and yellow balls": dataclasses.replace(
        SAMPLE_CLIP, balls=(Ball("green", "medium", "from right to left", 0.3, 2.5, lane=0.75),
                            Ball("yellow", "medium", "from left to right", 1.5, 3.8, lane=0.35)),
    ),
}
TOP_MOMENTS = 3
HEATMAP_COLUMNS = 4  # a taller grid than the default 8 columns, to fit the page's right column
NO_MEDIA = "Upload a video or an image, or pick an example clip, before asking."
# Clicking a moment seeks the player in the browser (no round trip to the server).
SEEK_VIDEO = """(start) => {
    const player = document.querySelector('#video video');
    if (player && start != null) player.currentTime = start;
}"""


@dataclasses.dataclass
class Session:
    """One visitor's conversation: the media block of its first user turn and the messages so far."""

    media: dict
    name: str
    messages: list[dict] = dataclasses.field(default_factory=list)


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, as the page shows it (never a traceback)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'no message'}"


def error_text(error: BaseException) -> str:
    """The page's one-line error: the package's own message for bad input, and a pointer to the log otherwise."""
    if isinstance(error, (ValueError, TypeError, OSError)):
        return f"**Error** — {one_line(error)}"
    logger.error("Unexpected error in the web demo", exc_info=error)
    return f"**Error** — {one_line(error)} (unexpected; the server log has the details)"


def open_media(path: str, num_frames: int, name: str | None = None) -> Session:
    """A session about the file at `path` (called `name`, default its file name): decoded once here so that a bad file
    is refused at once, with the decoder's own error (a still image is a one-frame video without a frame rate and
    becomes an image turn)."""
    _, metadata = decode_video(path, num_frames=num_frames)
    name = name or Path(path).name
    if metadata.fps is None:
        with Image.open(path) as image:
            return Session({"type": "image", "image": image.convert("RGB")}, name)
    return Session({"type": "video", "path": str(path)}, name)


def png(save) -> Image.Image:
    """The PNG a `VideoRelevance.save_*` method draws, kept in memory (no temporary file)."""
    buffer = io.BytesIO()
    save(buffer)
    buffer.seek(0)
    return Image.open(buffer)


def token_counts(chat: VisualChat, budget: int) -> str:
    """What the last turn's pooling kept, e.g. "16 frames × 6×8 patches → 64 tokens"."""
    encoded = chat.encoded
    if "video" in encoded:
        frames, rows, columns = encoded["video"].relevance[0].shape
        pooled = encoded["video"].pooler_output[0].shape[0]
        limit = f"budget {budget}" if budget else "no budget"
        return f"{frames} frames × {rows}×{columns} patches → {pooled} tokens ({limit})"
    pooled = encoded["image"].pooler_output[0].shape[0]
    return f"image → {pooled} tokens"


class WebDemo:
    """The Gradio app around one loaded model; `blocks` is the page, `launch` serves it."""

    def __init__(self, loaded: LoadedModel, max_new_tokens: int, default_num_frames: int | None = None,
                 default_budget: int | None = None):
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        processor = loaded.processor
        self.default_num_frames = default_num_frames or processor.video_processor.num_frames
        self.default_budget = default_budget or loaded.model.config.max_visual_tokens or 0
        self._examples = tempfile.TemporaryDirectory(prefix="ppllava-demo-")
        atexit.register(self._examples.cleanup)
        self.example_paths = {
            name: str(clip.write(Path(self._examples.name) / f"example-{number}.mp4"))
            for number, (name, clip) in enumerate(EXAMPLE_CLIPS.items())
        }
        self.blocks = self._build()

    # Event handlers: each returns (or yields) updates and turns any failure into the page's one-line error.

    def load(self, path: str | None, num_frames: int, name: str | None = None) -> tuple:
        """A new upload or example: a fresh session, its preview, an empty chat and no relevance yet (or the file's
        error); the upload box is emptied either way, ready for the next file."""
        # The emptied upload box, heatmap, timeline and moments.
        cleared = (None, None, None, gr.update(choices=[], value=None))
        no_media = (None, gr.update(value=None), gr.update(value=None, visible=False), [])
        if not path:
            return *no_media, "", "", *cleared
        try:
            session = open_media(path, int(num_frames), name)
        except Exception as error:  # noqa: BLE001 - every failure becomes the page's one-line error
            return *no_media, error_text(error), "", *cleared
        is_video = session.media["type"] == "video"
        return (
            session,
            gr.update(value=path if is_video else None, visible=is_video),
            gr.update(value=None if is_video else session.media["image"], visible=not is_video),
            [],
            "",
            f"Loaded **{session.name}** ({session.media['type']}). Ask a question.",
            *cleared,
        )

    def load_example(self, name: str | None, num_frames: int) -> tuple:
        return self.load(self.example_paths.get(name), num_frames, name)

    def respond(self, question: str, history: list, session: Session | None, num_frames: int, budget: int) -> Iterator:
        """Stream the answer to `question` into the chat, then show the turn's heatmap, timeline and moments."""
        outputs = ["", history, session, gr.update(), gr.update(), gr.update(), "", gr.update()]
        question = (question or "").strip()
        if session is None or not question:
            outputs[6] = f"**Error** — {NO_MEDIA if session is None else 'Type a question first.'}"
            yield outputs
            return
        kwargs = {"num_frames": int(num_frames)}
        if budget:
            kwargs["max_visual_tokens"] = int(budget)
        if session.media["type"] == "video":
            kwargs["return_metadata"] = True
        chat = VisualChat(self.loaded, session.media, kwargs, self.max_new_tokens)
        chat.messages = list(session.messages)
        streamer = TextIteratorStreamer(self.loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def answer():
            try:
                chat.ask(question, streamer)
            except Exception as error:  # noqa: BLE001 - reported in the page below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=answer, daemon=True)
        worker.start()
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        for piece in streamer:
            history[-1]["content"] += piece
            outputs[1] = history
            yield outputs
        worker.join()
        if failure:
            outputs[1] = history[:-2]
            outputs[6] = error_text(failure[0])
            yield outputs
            return
        history[-1]["content"] = chat.messages[-1]["content"][0]["text"]
        turn = sum(message["role"] == "user" for message in chat.messages)
        note = f"**{session.name}**: {token_counts(chat, int(budget))}"
        if turn > 1:
            note += f" — turn {turn}: re-pooled the {session.media['type']} under this question"
        outputs[1], outputs[2], outputs[7] = history, dataclasses.replace(session, messages=chat.messages), note
        if session.media["type"] == "video":
            relevance = VideoRelevance.from_encoding(
                question, chat.encoded["video"].relevance[0], chat.inputs["pixel_values_videos"][0],
                self.loaded.processor.video_processor, chat.inputs["video_metadata"][0],
            )
            moments = relevance.top_time_ranges(TOP_MOMENTS)
            outputs[3] = png(lambda target: relevance.save_heatmap(target, columns=HEATMAP_COLUMNS))
            outputs[4] = png(lambda target: relevance.save_timeline(target, top_k=TOP_MOMENTS))
            outputs[5] = gr.update(choices=[(f"#{n} {moment}", moment.start) for n, moment in enumerate(moments, 1)],
                                   value=None)
        else:
            outputs[3], outputs[4], outputs[5] = None, None, gr.update(choices=[], value=None)
        yield outputs

    def _build(self) -> gr.Blocks:
        loaded = self.loaded
        source = "the embedded default" if loaded.is_embedded_default else "this model"
        with gr.Blocks(title="PPLLaVA web demo", analytics_enabled=False, delete_cache=(600, 3600)) as blocks:
            session = gr.State(None)
            gr.Markdown(
                "# PPLLaVA: prompt-guided pooling\nThe question decides which patches and moments count: the heatmap "
                "and the timeline show where and when the video matches it."
                + (f"\n\n*{EMBEDDED_DEFAULT_NOTE}*" if loaded.is_embedded_default else "")
            )
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Upload a video or an image", file_types=["video", "image"],
                                     elem_id="upload")
                    example = gr.Radio(list(self.example_paths), label="…or pick an example clip", elem_id="examples")
                    video = gr.Video(label="Video", interactive=False, elem_id="video")
                    image = gr.Image(label="Image", interactive=False, visible=False, elem_id="image")
                    num_frames = gr.Slider(1, 64, value=self.default_num_frames, step=1, label="num_frames",
                                           info="Frames sampled from the video", elem_id="num-frames")
                    budget = gr.Slider(0, 1024, value=self.default_budget, step=1, label="max_visual_tokens",
                                       info="Visual-token budget per video (0: none, the pooling's own size)",
                                       elem_id="budget")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label=f"Chat with {source}", height=380, elem_id="chat")
                    question = gr.Textbox(label="Question", placeholder="Where does the red ball go?",
                                          elem_id="question")
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    status = gr.Markdown(elem_id="status")
                    error = gr.Markdown(elem_id="error")
                with gr.Column(scale=2):
                    heatmap = gr.Image(label="Where: relevance over the frames the model saw", type="pil",
                                       interactive=False, elem_id="heatmap", format="png")
                    timeline = gr.Image(label="When: relevance over time", type="pil", interactive=False,
                                        elem_id="timeline", format="png")
                    moments = gr.Radio([], label="Top moments (click to seek the video)", elem_id="moments")
            loaded_outputs = [session, video, image, chatbot, error, status, upload, heatmap, timeline, moments]
            upload.upload(self.load, [upload, num_frames], loaded_outputs)
            example.input(self.load_example, [example, num_frames], loaded_outputs)
            answer_outputs = [question, chatbot, session, heatmap, timeline, moments, error, status]
            for trigger in (ask.click, question.submit):
                trigger(self.respond, [question, chatbot, session, num_frames, budget], answer_outputs)
            moments.input(None, moments, None, js=SEEK_VIDEO)
        return blocks

    def launch(self, host: str, port: int, max_upload_mb: int, concurrency: int, **kwargs) -> None:
        """Serve the page: requests queue `concurrency` at a time, uploads above `max_upload_mb` are refused."""
        self.blocks.queue(default_concurrency_limit=concurrency).launch(
            server_name=host, server_port=port, max_file_size=f"{max_upload_mb}mb", share=False,
            footer_links=[], **kwargs,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # A Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT for the address it expects the app on.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Address to serve on (0.0.0.0 for every interface; default $GRADIO_SERVER_NAME or local).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max-upload-mb", type=int, default=50, help="Largest upload accepted, in megabytes.")
    parser.add_argument("--concurrency", type=int, default=1, help="Requests answered at once; the rest wait.")
    add_model_arguments(parser)
    parser.set_defaults(max_new_tokens=64)
    return parser.parse_args(argv)


def build_app(argv: list[str] | None = None) -> tuple[WebDemo, argparse.Namespace]:
    """The demo for the command-line flags `argv`, with its model loaded."""
    args = parse_args(argv)
    demo = WebDemo(load_model(args), args.max_new_tokens, args.num_frames, args.max_visual_tokens)
    return demo, args


def main(argv: list[str] | None = None) -> None:
    demo, args = build_app(argv)
    demo.launch(args.host, args.port, args.max_upload_mb, args.concurrency)


if __name__ == "__main__":
    main()
