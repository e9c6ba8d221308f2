"""PPLLaVA as an lmms-eval model, without forking lmms-eval:

    python -m lmms_eval --model ppllava --model_args pretrained=PATH --tasks mvbench,videomme --batch_size 4

It is registered as `ppllava` through lmms-eval's entry-point group for external models (`lmms_eval.models` in
setup.cfg), whose payload is `LMMS_EVAL_MANIFEST`; `pip install -e ".[eval]"` (see the README) installs both.

MVBench tasks (`mvbench_*`) and VideoMME tasks (`videomme`, `videomme_long`, `videomme_w_subtitle`,
`videomme_long_w_subtitle`) are asked as PPLLaVA's published evaluation asks them (`ppllava_hf.evaluation.prompts`),
built from the task's document: its prompt, prefill, frame count and pooling prompt. Every other task (and every task
with `prompts=task`) is asked the task's own text, which is then also the pooling prompt. lmms-eval scores the answers
with the task's own metric.
"""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from lmms_eval import utils as lmms_eval_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ppllava_hf import PPLLaVAVideoMetadata, decode_video
from ppllava_hf.conversion.original_checkpoint import is_local_path

from .prompts import (
    MVBENCH_NUM_FRAMES,
    BenchmarkPrompt,
    mvbench_prompt,
    render_prompt,
    videomme_num_frames,
    videomme_prompt,
    videomme_subtitles,
)


VIDEOMME_TASKS = ("videomme", "videomme_long", "videomme_w_subtitle", "videomme_long_w_subtitle")
PROMPT_STYLES = ("ppllava", "task")


def positive_whole_number(value, name: str) -> int | None:
    """`value` (lmms-eval reads `num_frames=-4` as the float -4.0) as an int, when it is a whole number above 0;
    `None` stays `None` (the default); anything else is refused before the model loads."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1 (or left out for the default), got {value!r}.")
    return int(value)


def check_pretrained_source(pretrained: str) -> None:
    """A `pretrained=` that names a place on this machine (`conversion.original_checkpoint.is_local_path`), or that no
    Hub id could be (`a/b/c`), must be an existing folder: the Hub would answer "Repo id must be in the form ..."
    instead of saying that the folder is missing."""
    source = str(pretrained)
    if os.path.isdir(source):
        return
    try:
        validate_repo_id(source)
        hub_id = True
    except HFValidationError:
        hub_id = False
    if is_local_path(source) or not hub_id:
        what = "is a file, not a model folder" if os.path.exists(source) else "does not exist"
        raise ValueError(f"pretrained={source} {what}; pass a PPLLaVA model folder, or a Hub id owner/name.")


@dataclass
class VisualQuestion:
    """One question to the model: its prompt and visual inputs (decoded video frames and PIL images, in order)."""

    prompt: BenchmarkPrompt
    media: list[str] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)


class PPLLaVALmmsEval(lmms):
    """lmms-eval's `ppllava` model: `generate_until` (left-padded batches), `loglikelihood` and
    `generate_until_multi_round` on a PPLLaVA checkpoint, with videos (file paths or frame folders) and PIL images
    going through the checkpoint's processor and chat template.

    Args (`--model_args key=value,...`):
        pretrained: a PPLLaVA folder or Hub id.
        num_frames: frames sampled per video for every task (default: PPLLaVA's per benchmark, 32 for MVBench, 32 or 64
            by duration for VideoMME, else the processor's).
        max_visual_tokens: visual-token budget per video (default: the model config's).
        batch_size: questions generated together.
        device: where the model runs (default: cuda when available, the local rank's GPU under `accelerate launch`).
        device_map: a transformers `device_map` (e.g. `auto`) instead of `device`.
        dtype: `auto` (the checkpoint's), `bfloat16`, `float16` or `float32`.
        attn_implementation: the attention back-end (`sdpa`, `flash_attention_2`, `eager`).
        prompts: `ppllava` (PPLLaVA's MVBench / VideoMME prompts) or `task` (the task's text everywhere).
        subtitles_dir: VideoMME's `.srt` folder, required by the `*_w_subtitle` tasks (lmms-eval downloads it to
            `$HF_HOME/videomme/subtitle`).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        num_frames: int | None = None,
        max_visual_tokens: int | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        device_map: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        prompts: str = "ppllava",
        subtitles_dir: str | None = None,
    ) -> None:
        super().__init__()
        if prompts not in PROMPT_STYLES:
            raise ValueError(f"prompts must be one of {PROMPT_STYLES}, got {prompts!r}.")
        if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}.")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive whole number ('auto' is not supported), got {batch_size!r}.")
        check_pretrained_source(pretrained)
        self.num_frames = positive_whole_number(num_frames, "num_frames")
        self.max_visual_tokens = positive_whole_number(max_visual_tokens, "max_visual_tokens")
        self.batch_size_per_device = int(batch_size)
        self.prompts = prompts
        self.subtitles_dir = subtitles_dir

        load_options = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation is not None:
            load_options["attn_implementation"] = attn_implementation
        if device_map is not None:
            load_options["device_map"] = device_map
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_options)
        self.model = (model if device_map is not None else model.to(self._resolve_device(device))).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)

    @staticmethod
    def _resolve_device(device: str | None) -> torch.device:
        """The requested device; by default the local rank's GPU when several processes run, cuda, or the CPU."""
        if device is not None:
            return torch.device(device)
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    # ------------------------------------------------------------------------------------------------------------------
    # lmms-eval's request types

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The answer to each request's question, generated with the task's `generation_kwargs` (`until`,
        `max_new_tokens`, `temperature`, `top_p`, `num_beams`, `do_sample`), `batch_size` questions at a time."""
        collator = lmms_eval_utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        answers = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding") as progress:
            for chunk in collator.get_batched(n=self.batch_size):
                questions = [
                    self._question(context, self._visuals(doc_to_visual, task, split, doc_id), task, split, doc_id)
                    for context, _, doc_to_visual, doc_id, task, split in chunk
                ]
                answers.extend(self._generate(questions, chunk[0][1]))
                progress.update(len(chunk))
        return collator.get_original(answers)

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation after the task's text and visuals, whether greedy decoding yields it)."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc="Model Responding"
        ):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            question = self._question(context, self._visuals(doc_to_visual, task, split, doc_id))
            rendered = render_prompt(self.processor, question.prompt, question.media)
            prompt, continuation_ids = self._split_tokens(rendered, continuation)
            inputs = self._model_inputs([question], texts=[prompt])
            continuation_ids = torch.tensor([continuation_ids], device=self.device)
            length = continuation_ids.shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], continuation_ids], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(continuation_ids)], dim=1)
            logits = self.model(**inputs, max_visual_tokens=self.max_visual_tokens, logits_to_keep=length + 1).logits
            log_probs = logits[0, :length].float().log_softmax(dim=-1)
            chosen = log_probs.gather(-1, continuation_ids[0, :, None]).sum()
            results.append((chosen.item(), bool((log_probs.argmax(dim=-1) == continuation_ids[0]).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """The answers of every round of each request: round 0 asks the task's text, each later round what the task's
        `doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)` returns, until it ends."""
        results = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc="Model Responding"
        ):
            doc = self.task_dict[task][split][doc_id]
            question = self._question(context, self._visuals(doc_to_visual, task, split, doc_id))
            answers, round_info, round_index = [], None, 0
            while True:
                answers.append(self._generate([question], gen_kwargs)[0])
                round_index += 1
                visuals, text, finished, answers, round_info = doc_to_text(
                    doc, previous_output=answers, round_idx=round_index, previous_round_info=round_info
                )
                answers = list(answers)
                if finished:
                    break
                question = self._question(text, visuals or [])
            results.append(answers)
        return results

    # ------------------------------------------------------------------------------------------------------------------
    # Questions

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        return doc_to_visual(self.task_dict[task][split][doc_id]) or []

    def _benchmark(self, task: str | None) -> str | None:
        """Which PPLLaVA prompt a task gets: "mvbench", "videomme", or None (the task's text)."""
        if self.prompts != "ppllava" or task is None:
            return None
        if task.startswith("mvbench_"):
            return "mvbench"
        return "videomme" if task in VIDEOMME_TASKS else None

    def _question(
        self,
        context: str,
        visuals: Sequence,
        task: str | None = None,
        split: str | None = None,
        doc_id: int | None = None,
    ) -> VisualQuestion:
        """The question a request asks: decoded videos and images, and the prompt of its benchmark (from the task's
        document) or its text (`context`, without `<image>` / `<video>` placeholders: the chat template places them)."""
        benchmark = self._benchmark(task)
        doc = self.task_dict[task][split][doc_id] if benchmark else None
        question = VisualQuestion(prompt=BenchmarkPrompt(text="", pooling_prompt=""))
        video_metadata = []
        for visual in visuals:
            if isinstance(visual, Image.Image):
                question.media.append("image")
                question.images.append(visual.convert("RGB"))
            elif isinstance(visual, (str, os.PathLike)):
                frames, metadata = decode_video(visual, *self._frame_sampling(benchmark, doc))
                question.media.append("video")
                question.videos.append(frames)
                video_metadata.append(metadata)
            else:
                raise TypeError(
                    f"The ppllava model takes videos (file or frame-folder paths) and PIL images; task {task!r} gave a "
                    f"{type(visual).__name__}."
                )
        if benchmark == "mvbench":
            question.prompt = mvbench_prompt(doc["question"], doc["candidates"])
        elif benchmark == "videomme":
            subtitles = self._videomme_subtitles(task, doc, video_metadata)
            question.prompt = videomme_prompt(doc["question"], doc["options"], subtitles)
        else:
            for token in (self.processor.image_token, self.processor.video_token):
                context = context.replace(token, "")
            question.prompt = BenchmarkPrompt(text=context, pooling_prompt=context)
        return question

    def _frame_sampling(self, benchmark: str | None, doc: dict | None) -> tuple[int | None, float | None]:
        """(num_frames, fps) to sample a video with: `num_frames` if given, else PPLLaVA's count for the benchmark,
        else the processor's default."""
        if self.num_frames is not None:
            return self.num_frames, None
        if benchmark == "mvbench":
            return MVBENCH_NUM_FRAMES, None
        if benchmark == "videomme":
            return videomme_num_frames(doc["duration"]), None
        video_processor = self.processor.video_processor
        return video_processor.num_frames, video_processor.fps

    def _videomme_subtitles(self, task: str, doc: dict, video_metadata: list[PPLLaVAVideoMetadata]) -> str | None:
        """The subtitles of the sampled frames for the `*_w_subtitle` tasks (None when the video has no `.srt`)."""
        if not task.endswith("_w_subtitle"):
            return None
        if self.subtitles_dir is None:
            raise ValueError(
                f"Task {task!r} asks with subtitles: pass subtitles_dir=FOLDER (VideoMME's .srt files; lmms-eval "
                "downloads them to $HF_HOME/videomme/subtitle) in --model_args."
            )
        path = os.path.join(self.subtitles_dir, f"{doc['videoID']}.srt")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as file:
            srt_text = file.read()
        metadata = video_metadata[0]
        return videomme_subtitles(srt_text, metadata.frames_indices, metadata.fps)

    # ------------------------------------------------------------------------------------------------------------------
    # Model calls

    def _split_tokens(self, prompt: str, continuation: str) -> tuple[str, list[int]]:
        """(the prompt without trailing whitespace, the token ids of the rest of `prompt + continuation`), tokenized
        together as lm-eval does, so that the continuation's first token is the one the text has there (a prompt's
        trailing space belongs to the continuation's first word)."""
        context = prompt.rstrip()
        tokenizer = self.processor.tokenizer
        whole = tokenizer(prompt + continuation).input_ids
        return context, whole[len(tokenizer(context).input_ids) :]

    def _model_inputs(
        self, questions: Sequence[VisualQuestion], padding_side: str = "right", texts: list[str] | None = None
    ) -> dict:
        """Processor outputs for a batch of questions (their rendered prompts, or `texts`), on the model's device and
        dtype."""
        videos = [video for question in questions for video in question.videos]
        images = [image for question in questions for image in question.images]
        options = {} if self.max_visual_tokens is None else {"max_visual_tokens": self.max_visual_tokens}
        inputs = self.processor(
            text=texts or [render_prompt(self.processor, question.prompt, question.media) for question in questions],
            videos=videos or None,
            images=images or None,
            pooling_prompt=[question.prompt.pooling_prompt for question in questions],
            padding_side=padding_side,
            **options,
        )
        return inputs.to(self.device, dtype=self.model.dtype)

    @torch.inference_mode()
    def _generate(self, questions: Sequence[VisualQuestion], generation_kwargs: dict) -> list[str]:
        """The predictions for a batch of questions: generated together (left-padded), cut at the first `until`
        string, in each benchmark's prediction form."""
        options = dict(generation_kwargs)
        until = options.pop("until", None)
        inputs = self._model_inputs(questions, padding_side="left")
        output = self.model.generate(
            **inputs, **generation_options(options), max_visual_tokens=self.max_visual_tokens
        )
        texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [question.prompt.prediction(cut_at_stop(text, until)) for question, text in zip(questions, texts)]


def generation_options(generation_kwargs: dict) -> dict:
    """`generate` arguments from an lmms-eval task's `generation_kwargs`: greedy unless `do_sample` or a positive
    `temperature` asks to sample (with `temperature` and `top_p`); `max_new_tokens` and `num_beams` as given."""
    temperature = generation_kwargs.get("temperature") or 0
    sample = bool(generation_kwargs.get("do_sample")) or temperature > 0
    options = {"do_sample": sample, "num_beams": generation_kwargs.get("num_beams") or 1}
    if generation_kwargs.get("max_new_tokens") is not None:
        options["max_new_tokens"] = generation_kwargs["max_new_tokens"]
    if sample:
        options.update({key: generation_kwargs[key] for key in ("temperature", "top_p") if generation_kwargs.get(key)})
    return options


def cut_at_stop(text: str, until: str | Iterable[str] | None) -> str:
    """`text` up to the first of the `until` strings it contains."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


LMMS_EVAL_MANIFEST = ModelManifest(model_id="ppllava", simple_class_path=f"{__name__}.{PPLLaVALmmsEval.__name__}")
