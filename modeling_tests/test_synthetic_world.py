"""The synthetic ball world: clips follow their description, questions have the answers the pixels show, and the
ground truth (when a ball is in view, which patches it covers) agrees with the frames."""

from collections import Counter

import numpy as np
import pytest

from ppllava_hf import decode_video
from ppllava_hf.testing.synthetic_world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    Background,
    Ball,
    Clip,
    questions,
    sample_clips,
)


CLIPS = sample_clips(seed=123, count=200)


def ball_pixels(clip: Clip, ball: Ball, time: float) -> np.ndarray:
    """Where the frame at `time` shows exactly the ball's colour (the backgrounds never come close to it)."""
    return (clip.frame(time) == COLOURS[ball.colour]).all(-1)


def one_ball_clip(direction: str, enters: float = 1.0, leaves: float = 3.0) -> Clip:
    ball = Ball("blue", "large", direction, enters, leaves, lane=0.5)
    return Clip(4.0, 10, 60, 72, Background("plain", ((120, 120, 120),)), (ball,))


def test_the_same_seed_draws_the_same_clips_and_the_world_is_varied():
    assert sample_clips(seed=123, count=200) == CLIPS
    assert sample_clips(seed=124, count=5) != CLIPS[:5]
    balls = [ball for clip in CLIPS for ball in clip.balls]
    assert set(Counter(len(clip.balls) for clip in CLIPS)) == {0, 1, 2}
    assert {ball.colour for ball in balls} == set(COLOURS) and {ball.direction for ball in balls} == set(DIRECTIONS)
    assert {clip.background.kind for clip in CLIPS} == set(BACKGROUNDS)
    assert len({(clip.height, clip.width) for clip in CLIPS}) > 50 and len({clip.fps for clip in CLIPS}) > 3
    assert len({clip.seconds for clip in CLIPS}) > 20
    assert any(ball.enters < 0 for ball in balls) and any(ball.leaves > clip.seconds for clip in CLIPS for ball in clip.balls)


def test_two_balls_of_a_clip_have_different_colours():
    assert all(len({ball.colour for ball in clip.balls}) == len(clip.balls) for clip in CLIPS)


@pytest.mark.parametrize("index", range(0, 200, 25))
def test_a_ball_is_on_screen_exactly_while_the_clip_says_it_is_visible(index):
    clip = CLIPS[index]
    for ball in clip.balls:
        start, end = clip.visible_interval(ball)
        assert ball_pixels(clip, ball, (start + end) / 2).any()
        for outside in (ball.enters - 0.05, ball.leaves + 0.05):
            assert not ball_pixels(clip, ball, outside).any()


@pytest.mark.parametrize(
    "direction, axis, sign",
    [("from left to right", 1, 1), ("from right to left", 1, -1), ("from top to bottom", 0, 1), ("from bottom to top", 0, -1)],
)
def test_balls_move_the_way_their_direction_says(direction, axis, sign):
    clip = one_ball_clip(direction)
    (ball,) = clip.balls
    positions = [np.argwhere(ball_pixels(clip, ball, time)).mean(0)[axis] for time in (1.5, 2.0, 2.5)]
    assert sign * np.diff(positions).min() > 5


def test_coverage_is_the_share_of_each_cell_the_ball_covers():
    clip = one_ball_clip("from left to right")
    (ball,) = clip.balls
    coverage = clip.coverage(ball, 2.0, (6, 6))
    pixels = ball_pixels(clip, ball, 2.0)
    assert coverage.shape == (6, 6)
    assert coverage.sum() * 10 * 12 == pytest.approx(pixels.sum())  # cells of 10 x 12 pixels
    assert coverage[2:4, 2:4].min() > 0.4 and coverage[0].max() == coverage[:, 0].max() == 0
    assert not clip.coverage(ball, 0.5, (6, 6)).any()


def test_questions_have_the_answers_the_clip_shows():
    rng = np.random.default_rng(0)
    for clip in CLIPS:
        visible = [ball for ball in clip.balls if clip.visible_interval(ball) is not None]
        for question in questions(clip, rng):
            assert question.option is None or question.option in question.options
            if question.kind == "count":
                assert question.answer == ["Zero.", "One.", "Two."][len(visible)]
            elif question.kind == "existence":
                named = clip.balls_called(question.referent)
                assert question.answer == ("Yes." if named else "No.")
            elif question.kind == "colour":
                assert len(visible) == 1 and question.answer == visible[0].colour.capitalize() + "."
            elif question.kind == "direction":
                (ball,) = clip.balls_called(question.referent)
                assert question.answer.lower() == ball.direction + "."
            else:
                (ball,) = clip.balls_called(question.referent)
                start, end = clip.visible_interval(ball)
                assert question.answer == f"From {start:.1f} s to {end:.1f} s."


def test_every_clip_is_asked_about_existence_and_count_and_each_ball_about_its_direction_and_time():
    rng = np.random.default_rng(0)
    for clip in CLIPS[:50]:
        kinds = Counter(question.kind for question in questions(clip, rng))
        assert kinds["existence"] == kinds["count"] == 1
        assert kinds["direction"] == kinds["when"] == len(clip.balls)
        assert kinds["colour"] == (len(clip.balls) == 1)


def test_a_written_clip_decodes_to_its_frames(tmp_path):
    clip = one_ball_clip("from top to bottom")
    path = clip.write(tmp_path / "clip.mp4")
    frames, metadata = decode_video(path, num_frames=None)
    assert frames.shape == (clip.num_frames, clip.height, clip.width, 3) and metadata.fps == pytest.approx(10)
    # H.264 keeps flat colours to within a few levels.
    assert np.abs(frames[20].astype(int) - clip.frame(2.0)).mean() < 3


def test_a_ball_with_an_unknown_colour_or_leaving_before_it_enters_is_refused():
    with pytest.raises(ValueError, match="colours are"):
        Ball("purple", "small", "from left to right", 0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="enter before it leaves"):
        Ball("red", "small", "from left to right", 2.0, 1.0, 0.5)
