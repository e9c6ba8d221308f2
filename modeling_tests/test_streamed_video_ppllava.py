"""Streamed long videos: a video read a chunk of frames at a time, scored on a first pass and pooled on a second, gives
the in-memory path's tokens, relevance and greedy answers, and never holds more than a chunk of pixels."""

import json
import sys
from pathlib import Path

import pytest
import torch
from model_tester import record_calls
from test_long_video_ppllava import PROMPT, random_video, tiny_model
from video_test_files import write_video

from ppllava_hf import PPLLaVAForConditionalGeneration, PPLLaVAVideoProcessor
from ppllava_hf.models.ppllava.video_processing_ppllava import StreamedVideo
from ppllava_hf.testing.embedded_default import write_sample_video
from ppllava_hf.testing.tiny import tiny_config, tiny_processor


# float32 tokens through the same ops in other batch sizes: rounding only, far below the 1e-5 relative bound.
RELATIVE = 1e-5
TEXT = "USER: <video>\nWhat happens? ASSISTANT:"


class RecordedFrames:
    """A frame source over pixels `(frames, 3, H, W)` that records the frames of every read."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels
        self.reads: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, frames: slice) -> torch.Tensor:
        start, stop, _ = frames.indices(len(self))
        self.reads.append((start, stop))
        return self.pixels[start:stop].clone()


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    assert actual.shape == expected.shape
    assert float((actual - expected).abs().max()) <= RELATIVE * float(scale)


@pytest.mark.parametrize(
    "layout, overrides",
    [
        ("vicuna", dict(btadapter_max_frames=8, vision_chunk_frames=4)),  # adapter segments longer than a chunk
        ("vicuna", dict(btadapter_max_frames=8)),  # no chunk configured: streamed 32 frames at a time
        ("vicuna", dict(vision_chunk_frames=5)),  # one adapter segment over the whole video
        ("qwen", dict(vision_chunk_frames=4)),  # no BT-Adapter
    ],
)
def test_streamed_video_tokens_and_relevance_equal_the_in_memory_ones(layout, overrides):
    model = tiny_model(layout, max_visual_tokens=24, **overrides)
    video = random_video(37)

    with torch.no_grad():
        in_memory = model.get_video_features(video[None], clip_input_ids=PROMPT)
        streamed = model.get_video_features([RecordedFrames(video)], clip_input_ids=PROMPT)

    assert_relatively_close(streamed.pooler_output[0], in_memory.pooler_output[0])
    assert_relatively_close(streamed.relevance[0], in_memory.relevance[0])
    assert streamed.last_hidden_state is None  # the features of a streamed video never exist all at once


def test_streamed_video_reads_each_frame_twice_and_at_most_a_chunk_at_a_time():
    """The adapter's segments hold 8 frames, the chunk 3: pixels are read 3 frames at a time, on two passes."""
    model = tiny_model(btadapter_max_frames=8, vision_chunk_frames=3)
    frames = RecordedFrames(random_video(20))

    with torch.no_grad():
        model.get_video_features([frames], clip_input_ids=PROMPT)

    assert max(stop - start for start, stop in frames.reads) <= 3
    counts = torch.zeros(20, dtype=torch.long)
    for start, stop in frames.reads:
        counts[start:stop] += 1
    assert counts.tolist() == [2] * 20


def test_window_longer_than_the_chunk_is_projected_a_chunk_of_frames_at_a_time():
    """37 frames into 2 output frames: windows of 18 frames and more, pooled in parts of at most 4 frames each."""
    model = tiny_model(btadapter_max_frames=8, vision_chunk_frames=4, max_visual_tokens=8)
    video = random_video(37)
    assert model.video_pooling_plan(37).kernel[0] > 4
    projected_frames, hook = record_calls(model.multi_modal_projector.linear_1, lambda features: features.shape[1])

    with torch.no_grad():
        in_memory = model.get_video_features(video[None], clip_input_ids=PROMPT)
        projected_frames.clear()
        streamed = model.get_video_features([RecordedFrames(video)], clip_input_ids=PROMPT)
    hook.remove()

    assert max(projected_frames) <= 4
    assert_relatively_close(streamed.pooler_output[0], in_memory.pooler_output[0])


def test_streamed_relevance_equals_the_in_memory_relevance():
    model = tiny_model(btadapter_max_frames=8, vision_chunk_frames=4)
    video = random_video(19)

    relevance = model.get_video_relevance([RecordedFrames(video)], PROMPT)[0]

    assert_relatively_close(relevance, model.get_video_relevance(video[None], PROMPT)[0])


def test_streamed_video_refuses_gradients():
    model = tiny_model(vision_chunk_frames=4)

    with pytest.raises(ValueError, match="gradients cannot flow"):
        model.get_video_features([RecordedFrames(random_video(9))], clip_input_ids=PROMPT)


def test_streamed_video_refuses_to_return_vision_tower_outputs():
    model = tiny_model(vision_chunk_frames=4)

    with torch.no_grad(), pytest.raises(ValueError, match="keeps no vision features"):
        model.get_video_features([RecordedFrames(random_video(9))], clip_input_ids=PROMPT, output_hidden_states=True)


# ---------------------------------------------------------------------------------------------------------------------
# Files through the processor


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("streamed") / "long.mp4", "libx264", 120)


@pytest.fixture(scope="module")
def model_and_processor():
    config = tiny_config(btadapter_max_frames=8, vision_chunk_frames=4)
    torch.manual_seed(0)
    model = PPLLaVAForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.model.btadapter.parameters():
            parameter.normal_(0.0, 0.1)
    return model, tiny_processor(config)


def processed(processor, video_file, stream_min_frames):
    return processor(
        text=TEXT, videos=[str(video_file)], num_frames=40, stream_min_frames=stream_min_frames, return_tensors="pt"
    )


def test_video_file_at_the_threshold_is_streamed_and_below_it_decoded(video_file):
    processor = PPLLaVAVideoProcessor(size={"height": 84, "width": 84})

    streamed = processor(videos=[str(video_file)], num_frames=40, stream_min_frames=40)["pixel_values_videos"]
    decoded = processor(videos=[str(video_file)], num_frames=39, stream_min_frames=40)["pixel_values_videos"]
    never = processor(videos=[str(video_file)], num_frames=300, stream_min_frames=0)["pixel_values_videos"]

    assert isinstance(streamed[0], StreamedVideo) and len(streamed[0]) == 40
    assert isinstance(decoded, torch.Tensor) and isinstance(never, torch.Tensor)  # 300 frames: above the default 256


def test_streamed_pixels_equal_the_decoded_pixels(video_file):
    processor = PPLLaVAVideoProcessor(size={"height": 84, "width": 84})
    decoded = processor(videos=[str(video_file)], num_frames=40, stream_min_frames=0)["pixel_values_videos"][0]
    streamed = processor(videos=[str(video_file)], num_frames=40, stream_min_frames=1)["pixel_values_videos"][0]

    pieces = [streamed[start : start + 7] for start in range(0, 40, 7)]

    torch.testing.assert_close(torch.cat(pieces), decoded, rtol=0, atol=0)  # the same decoder and the same ops
    assert streamed.metadata.frames_indices == processor(
        videos=[str(video_file)], num_frames=40, stream_min_frames=0, return_metadata=True
    )["video_metadata"][0].frames_indices


def test_streamed_file_gives_the_in_memory_prompt_and_greedy_answer(model_and_processor, video_file):
    model, processor = model_and_processor
    in_memory = processed(processor, video_file, 0)
    streamed = processed(processor, video_file, 16)

    expected = model.generate(**in_memory, max_new_tokens=12, do_sample=False)
    answer = model.generate(**streamed, max_new_tokens=12, do_sample=False)

    assert isinstance(streamed["pixel_values_videos"][0], StreamedVideo)
    assert torch.equal(streamed["input_ids"], in_memory["input_ids"])
    assert torch.equal(answer, expected)


def test_streamed_tokens_reach_generate_as_encoder_outputs(model_and_processor, video_file):
    """A chat encodes the video once (`encode_multimodal`) and reuses its tokens every turn (`mm_encoder_outputs`)."""
    model, processor = model_and_processor
    inputs = processed(processor, video_file, 16)
    encode = dict(
        input_ids=inputs["input_ids"], clip_input_ids=inputs["clip_input_ids"],
        clip_attention_mask=inputs["clip_attention_mask"],
    )

    with torch.no_grad():
        streamed = model.encode_multimodal(pixel_values_videos=inputs["pixel_values_videos"], **encode)
        in_memory = model.encode_multimodal(
            pixel_values_videos=processed(processor, video_file, 0)["pixel_values_videos"], **encode
        )
    answer = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs=streamed,
        max_new_tokens=12, do_sample=False,
    )
    expected = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs=in_memory,
        max_new_tokens=12, do_sample=False,
    )

    assert_relatively_close(streamed["video"].pooler_output[0], in_memory["video"].pooler_output[0])
    assert torch.equal(answer, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Examples


def test_batch_infer_streams_long_files_to_the_same_answers(tmp_path):
    """--stream-min-frames at or below --num-frames streams every file (clip bounds included), a missing file still
    becomes its row's error, and the answers are the in-memory ones."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import batch_infer

    video = write_sample_video(tmp_path / "sample.mp4")
    rows = [
        {"id": "whole", "video": str(video), "question": "What colour is the ball?"},
        {"id": "clip", "video": str(video), "question": "Where does it go?", "start_time": 0.2, "end_time": 1.0},
        {"id": "missing", "video": str(tmp_path / "missing.mp4"), "question": "What happens?"},
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    answers = {}
    for stream_min_frames in ("0", "24"):
        output = tmp_path / f"answers-{stream_min_frames}.jsonl"
        batch_infer.main([
            "--input", str(questions), "--output", str(output), "--num-frames", "24", "--max-new-tokens", "6",
            "--stream-min-frames", stream_min_frames, "--batch-size", "3", "--device", "cpu",
        ])
        answers[stream_min_frames] = [json.loads(line) for line in output.read_text().splitlines()]

    assert answers["24"] == answers["0"]
    assert "answer" in answers["24"][1] and answers["24"][2]["error"].startswith("VideoDecodingError")
