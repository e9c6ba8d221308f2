"""A synthetic video world whose questions have deterministic answers: balls of named colours and sizes crossing varied
backgrounds, written with numpy and PyAV.

A `Clip` is a complete description (length, frame rate, resolution, background, balls), so everything follows from it:
its frames, the answers to its questions, when each ball is in view and which patches of the model's view it covers
(the ground truth that scores a relevance heatmap and "when" timeline). `sample_clip(rng)` draws a clip of the world:
2 to 6 s at 8 to 25 fps, 48 to 128 pixels high, a meadow under a sky, a plain colour, static noise or a gradient, and
no ball (15 %), one (65 %) or two of different colours (20 %), each crossing the frame in one of four directions,
entering and leaving at its own times (possibly already in view at the start, or still in view at the end).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np


Colour = tuple[int, int, int]
QuestionKind = Literal["colour", "direction", "existence", "count", "when"]

COLOURS: dict[str, Colour] = {
    "red": (220, 30, 30),
    "green": (40, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Ball radius as a fraction of the frame's shorter side.
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.11, "large": 0.15}
DIRECTIONS = ("from left to right", "from right to left", "from top to bottom", "from bottom to top")
BACKGROUNDS = ("meadow", "plain", "noise", "gradient")
# Things a question may ask about that never appear in the world.
ABSENT_OBJECTS = ("dog", "cat", "car", "person", "bird")
QUESTION_KINDS: tuple[QuestionKind, ...] = ("colour", "direction", "existence", "count", "when")
COUNT_WORDS = ("Zero", "One", "Two")
COUNT_OPTIONS = ("0", "1", "2", "3")

SKY, GRASS = (110, 170, 230), (70, 150, 60)
# A ball's colour is at least this far (RGB distance) from every colour of the background it crosses.
_MIN_CONTRAST = 100.0
_NOISE_AMPLITUDE = 30


@dataclass(frozen=True)
class Ball:
    """A ball crossing the frame in a straight line at constant speed.

    Attributes:
        colour, size: names from `COLOURS` and `SIZES`.
        direction: one of `DIRECTIONS`.
        enters, leaves: seconds at which it touches the edge it comes in from, and has just left through the opposite
            one; it is in view in between (either may lie outside the clip).
        lane: where it crosses, as a fraction of the frame across its motion (of the height for horizontal motion).
    """

    colour: str
    size: str
    direction: str
    enters: float
    leaves: float
    lane: float

    def __post_init__(self):
        if self.colour not in COLOURS or self.size not in SIZES or self.direction not in DIRECTIONS:
            raise ValueError(
                f"Unknown ball {self.colour!r} / {self.size!r} / {self.direction!r}: colours are {sorted(COLOURS)}, "
                f"sizes {sorted(SIZES)}, directions {list(DIRECTIONS)}."
            )
        if not self.enters < self.leaves:
            raise ValueError(f"A ball must enter before it leaves, got {self.enters} and {self.leaves} s.")

    def radius(self, height: int, width: int) -> float:
        return SIZES[self.size] * min(height, width)

    def centre(self, time: float, height: int, width: int) -> tuple[float, float] | None:
        """(row, column) of the centre at `time` seconds, or `None` when it is out of view."""
        if not self.enters < time < self.leaves:
            return None
        radius = self.radius(height, width)
        progress = (time - self.enters) / (self.leaves - self.enters)
        horizontal = self.direction in DIRECTIONS[:2]
        extent = width if horizontal else height
        along = -radius + progress * (extent + 2 * radius)
        if self.direction in ("from right to left", "from bottom to top"):
            along = extent - along
        return (self.lane * height, along) if horizontal else (along, self.lane * width)


@dataclass(frozen=True)
class Background:
    """What the balls cross: `meadow` (`colours` = sky, grass; the horizon at `horizon` of the height), `plain` (one
    colour), `noise` (one colour with static per-pixel noise drawn from `seed`) or `gradient` (first colour to second,
    left to right, or top to bottom when `vertical`)."""

    kind: str
    colours: tuple[Colour, ...]
    horizon: float = 0.6
    vertical: bool = False
    seed: int = 0

    def render(self, height: int, width: int) -> np.ndarray:
        """The `(height, width, 3)` uint8 image."""
        image = np.empty((height, width, 3), np.uint8)
        if self.kind == "meadow":
            horizon = round(height * self.horizon)
            image[:horizon], image[horizon:] = self.colours
        elif self.kind == "plain":
            image[:] = self.colours[0]
        elif self.kind == "noise":
            noise = np.random.default_rng(self.seed).integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, (height, width, 3))
            image[:] = np.clip(np.array(self.colours[0]) + noise, 0, 255)
        elif self.kind == "gradient":
            steps = np.linspace(0.0, 1.0, height if self.vertical else width)[:, None]
            ramp = (1 - steps) * np.array(self.colours[0]) + steps * np.array(self.colours[1])
            image[:] = (ramp[:, None] if self.vertical else ramp[None]).round().astype(np.uint8)
        else:
            raise ValueError(f"Unknown background {self.kind!r}; backgrounds are {list(BACKGROUNDS)}.")
        return image


@dataclass(frozen=True)
class Question:
    """A question about a clip with its deterministic answer.

    Attributes:
        kind: what it asks (`QUESTION_KINDS`).
        text: the question.
        answer: the free-form answer ("Red.", "From left to right.", "Yes.", "Two.", "From 1.0 s to 3.0 s.").
        referent: what it is about: a colour (that ball), "ball" (any ball) or an object absent from the world; the
            balls it names are where a prompt-guided relevance should go (`Clip.balls_called`).
        options, option: multiple-choice candidates and the right one among them (none for "when").
    """

    kind: QuestionKind
    text: str
    answer: str
    referent: str
    options: tuple[str, ...] = ()
    option: str | None = None


@dataclass(frozen=True)
class Clip:
    """A clip of the world: `seconds` long at `fps`, `height` x `width` pixels, its background and balls (drawn in
    order, later ones on top). Frame `i` shows the scene at `i / fps` seconds."""

    seconds: float
    fps: int
    height: int
    width: int
    background: Background
    balls: tuple[Ball, ...] = ()

    @property
    def num_frames(self) -> int:
        return round(self.seconds * self.fps)

    def frame(self, time: float) -> np.ndarray:
        """The RGB frame `(height, width, 3)` uint8 at `time` seconds."""
        return self._draw_balls(self.background.render(self.height, self.width), time)

    def frames(self) -> np.ndarray:
        """All `(num_frames, height, width, 3)` uint8 frames."""
        frames = np.broadcast_to(self.background.render(self.height, self.width), (self.num_frames, self.height, self.width, 3)).copy()
        for index, image in enumerate(frames):
            self._draw_balls(image, index / self.fps)
        return frames

    def write(self, path: str | Path) -> Path:
        """Encode the clip as H.264 (in the container of `path`'s suffix) with PyAV and return `path`."""
        return write_video(self.frames(), self.fps, path)

    def visible_interval(self, ball: Ball) -> tuple[float, float] | None:
        """Seconds `(start, end)` during which `ball` is in view within the clip, or `None` if never."""
        start, end = max(ball.enters, 0.0), min(ball.leaves, self.seconds)
        return (start, end) if start < end else None

    def coverage(self, ball: Ball, time: float, grid: tuple[int, int]) -> np.ndarray:
        """Fraction of each cell of a `(rows, columns)` grid over the whole frame that `ball` covers at `time`: with the
        grid of the model's patches, which patches show the ball (frames are squashed to the model's input, so cell
        `(r, c)` is patch `(r, c)`)."""
        rows, columns = grid
        disk = self._disk(ball, time)
        if disk is None:
            return np.zeros(grid)
        # Pixel i of n belongs to cell i * cells // n; each cell starts at the first pixel mapped to it.
        row_starts = -(-np.arange(rows) * self.height // rows)
        column_starts = -(-np.arange(columns) * self.width // columns)
        covered = np.add.reduceat(np.add.reduceat(disk.astype(float), row_starts, axis=0), column_starts, axis=1)
        sizes = np.outer(np.diff([*row_starts, self.height]), np.diff([*column_starts, self.width]))
        return covered / sizes

    def balls_called(self, referent: str) -> tuple[Ball, ...]:
        """The balls a question about `referent` (a colour, "ball" for any, or something else) is about."""
        if referent == "ball":
            return self.balls
        return tuple(ball for ball in self.balls if ball.colour == referent)

    def describe(self) -> str:
        """One line: what crosses the frame, and when."""
        if not self.balls:
            return f"no ball, {self.background.kind} background"
        parts = []
        for ball in self.balls:
            interval = self.visible_interval(ball)
            when = "never in view" if interval is None else f"in view {interval[0]:.1f}-{interval[1]:.1f} s"
            parts.append(f"a {ball.size} {ball.colour} ball {ball.direction}, {when}")
        return "; ".join(parts) + f", {self.background.kind} background"

    def _draw_balls(self, image: np.ndarray, time: float) -> np.ndarray:
        for ball in self.balls:
            disk = self._disk(ball, time)
            if disk is not None:
                image[disk] = COLOURS[ball.colour]
        return image

    def _disk(self, ball: Ball, time: float) -> np.ndarray | None:
        centre = ball.centre(time, self.height, self.width)
        if centre is None:
            return None
        rows, columns = np.ogrid[: self.height, : self.width]
        return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= ball.radius(self.height, self.width) ** 2


def write_video(frames: np.ndarray, fps: int, path: str | Path) -> Path:
    """Encode `(frames, height, width, 3)` uint8 frames (even height and width) as H.264 at `fps` with PyAV (x264's
    fastest preset: these flat synthetic frames compress well anyway)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options={"preset": "ultrafast"})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in [*(av.VideoFrame.from_ndarray(array, format="rgb24") for array in frames), None]:
            for packet in stream.encode(frame):
                container.mux(packet)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Drawing clips


def sample_clip(rng: np.random.Generator) -> Clip:
    """A random clip of the world (see the module docstring); the same generator state gives the same clip."""
    seconds = round(float(rng.uniform(2.0, 6.0)), 1)
    fps = int(rng.choice([8, 10, 12, 15, 24, 25]))
    height = 2 * int(rng.integers(24, 65))
    width = 2 * int(rng.integers(max(32, round(height * 0.45)), min(88, height) + 1))
    count = int(rng.choice(3, p=[0.15, 0.65, 0.2]))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    balls = tuple(_sample_ball(rng, str(colour), seconds) for colour in colours)
    background = _sample_background(rng, [COLOURS[ball.colour] for ball in balls])
    return Clip(seconds=seconds, fps=fps, height=height, width=width, background=background, balls=balls)


def sample_clips(seed: int, count: int) -> list[Clip]:
    """`count` clips drawn from `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return [sample_clip(rng) for _ in range(count)]


def _sample_ball(rng: np.random.Generator, colour: str, seconds: float) -> Ball:
    in_view = float(rng.uniform(0.35, 0.8)) * seconds
    enters = float(rng.uniform(-0.15 * in_view, seconds - 0.85 * in_view))
    return Ball(
        colour=colour,
        size=str(rng.choice(list(SIZES))),
        direction=str(rng.choice(DIRECTIONS)),
        enters=round(enters, 2),
        leaves=round(enters + in_view, 2),
        lane=round(float(rng.uniform(0.2, 0.8)), 2),
    )


def _sample_background(rng: np.random.Generator, ball_colours: Sequence[Colour]) -> Background:
    """A background none of whose colours is close to a ball's, so that every ball stands out."""
    while True:
        kind = str(rng.choice(BACKGROUNDS))
        if kind == "meadow":
            background = Background(
                kind, (_jitter(rng, SKY), _jitter(rng, GRASS)), horizon=round(float(rng.uniform(0.45, 0.7)), 2)
            )
        elif kind == "plain":
            background = Background(kind, (_muted(rng),))
        elif kind == "noise":
            background = Background(kind, (_muted(rng),), seed=int(rng.integers(2**31)))
        else:
            background = Background(kind, (_muted(rng), _muted(rng)), vertical=bool(rng.integers(2)))
        distances = [np.linalg.norm(np.subtract(a, b)) for a in background.colours for b in ball_colours]
        if min(distances, default=np.inf) >= _MIN_CONTRAST:
            return background


def _jitter(rng: np.random.Generator, colour: Colour, amount: int = 20) -> Colour:
    return tuple(int(np.clip(channel + rng.integers(-amount, amount + 1), 0, 255)) for channel in colour)


def _muted(rng: np.random.Generator) -> Colour:
    return tuple(int(channel) for channel in rng.integers(50, 201, 3))


# ----------------------------------------------------------------------------------------------------------------------
# Questions


def questions(clip: Clip, rng: np.random.Generator) -> list[Question]:
    """The clip's questions, one per kind that applies (per ball for direction and "when" when there are two), in the
    wording drawn from `rng`: colour and direction (if a ball is in view; colour only with one ball), existence (of a
    ball, a ball of some colour, or an absent object), count, and when each ball is visible."""
    balls = [ball for ball in clip.balls if clip.visible_interval(ball) is not None]
    asked: list[Question] = []
    if len(balls) == 1:
        asked.append(_colour_question(balls[0], rng))
    for ball in balls:
        asked.append(_direction_question(ball, len(balls) == 1, rng))
    asked.append(_existence_question(clip, rng))
    asked.append(_count_question(len(balls), rng))
    for ball in balls:
        asked.append(_when_question(clip, ball, len(balls) == 1, rng))
    return asked


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _options(rng: np.random.Generator, right: str, others: Sequence[str], count: int) -> tuple[str, ...]:
    wrong = [option for option in others if option != right]
    chosen = [wrong[index] for index in rng.permutation(len(wrong))[: count - 1]]
    chosen.insert(int(rng.integers(count)), right)
    return tuple(chosen)


def _sentence(words: str) -> str:
    return words[0].upper() + words[1:] + "."


def _colour_question(ball: Ball, rng: np.random.Generator) -> Question:
    text = _pick(rng, ["What colour is the ball?", "What color is the ball?", "What color is the moving object?",
                       "Which colour is the ball that crosses the frame?"])
    options = _options(rng, ball.colour, list(COLOURS), 4)
    return Question("colour", text, _sentence(ball.colour), "ball", options, ball.colour)


def _direction_question(ball: Ball, only_ball: bool, rng: np.random.Generator) -> Question:
    subject = _pick(rng, ["ball", f"{ball.colour} ball"]) if only_ball else f"{ball.colour} ball"
    text = _pick(rng, [f"Where does the {subject} go?", f"Which way does the {subject} roll?",
                       f"In which direction does the {subject} move?"])
    options = _options(rng, _sentence(ball.direction), [_sentence(direction) for direction in DIRECTIONS], 4)
    referent = "ball" if subject == "ball" else ball.colour
    return Question("direction", text, _sentence(ball.direction), referent, options, _sentence(ball.direction))


def _existence_question(clip: Clip, rng: np.random.Generator) -> Question:
    referent = _pick(rng, ["ball", "ball", str(rng.choice(list(COLOURS))), str(rng.choice(ABSENT_OBJECTS))])
    if referent == "ball":
        text = _pick(rng, ["Is there a ball?", "Is there a ball in the video?"])
    elif referent in COLOURS:
        text = f"Is there a {referent} ball?"
    else:
        text = f"Is there a {referent} in the video?"
    present = any(clip.visible_interval(ball) is not None for ball in clip.balls_called(referent))
    return Question("existence", text, "Yes." if present else "No.", referent, ("yes", "no"), "yes" if present else "no")


def _count_question(count: int, rng: np.random.Generator) -> Question:
    text = _pick(rng, ["How many balls are there?", "How many balls cross the frame?", "How many balls are in the video?"])
    return Question("count", text, COUNT_WORDS[count] + ".", "ball", COUNT_OPTIONS, COUNT_OPTIONS[count])


def _when_question(clip: Clip, ball: Ball, only_ball: bool, rng: np.random.Generator) -> Question:
    subject = _pick(rng, ["ball", f"{ball.colour} ball"]) if only_ball else f"{ball.colour} ball"
    text = _pick(rng, [f"When is the {subject} visible?", f"When is the {subject} in view?"])
    start, end = clip.visible_interval(ball)
    referent = "ball" if subject == "ball" else ball.colour
    return Question("when", text, f"From {start:.1f} s to {end:.1f} s.", referent)


def world_sentences() -> list[str]:
    """Every question and free-form answer wording of the world (with every colour, object and direction), for
    training tokenizers that know the world's words."""
    colour_free = [("ball", None)] + [(f"{colour} ball", colour) for colour in COLOURS]
    sentences = ["What colour is the ball?", "What color is the ball?", "What color is the moving object?",
                 "Which colour is the ball that crosses the frame?", "Is there a ball?", "Is there a ball in the video?",
                 "How many balls are there?", "How many balls cross the frame?", "How many balls are in the video?"]
    for subject, _ in colour_free:
        sentences += [f"Where does the {subject} go?", f"Which way does the {subject} roll?",
                      f"In which direction does the {subject} move?", f"When is the {subject} visible?",
                      f"When is the {subject} in view?", f"Is there a {subject}?"]
    sentences += [f"Is there a {thing} in the video?" for thing in ABSENT_OBJECTS]
    sentences += [_sentence(colour) for colour in COLOURS] + [_sentence(direction) for direction in DIRECTIONS]
    sentences += ["Yes.", "No.", *(word + "." for word in COUNT_WORDS), "From 1.0 s to 3.0 s."]
    return sentences


__all__ = [
    "ABSENT_OBJECTS",
    "BACKGROUNDS",
    "COLOURS",
    "DIRECTIONS",
    "GRASS",
    "QUESTION_KINDS",
    "SIZES",
    "SKY",
    "Background",
    "Ball",
    "Clip",
    "Question",
    "questions",
    "sample_clip",
    "sample_clips",
    "world_sentences",
    "write_video",
]
