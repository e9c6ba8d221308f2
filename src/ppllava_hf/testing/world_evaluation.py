"""How well a PPLLaVA model knows the synthetic world, measured on clips it never saw.

- answers: greedy free-form answers to every question of each clip, right when they equal the world's answer (case and
  final period aside), counted per question kind;
- moments: for every "when" question, the IoU of the relevance timeline's top range (`video_relevance(...)
  .top_time_ranges(1)`) with the time the ball is really in view;
- where: for the same questions, the share of the relevance that falls on the patches the ball covers, against the
  share of all patches those are (the relevance a model that looks everywhere would put there).
"""

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..evaluation.prompts import BenchmarkPrompt, render_prompt
from ..relevance import video_relevance
from .synthetic_world import QUESTION_KINDS, Ball, Clip, Question, questions, sample_clips


TEXT_KINDS = tuple(kind for kind in QUESTION_KINDS if kind != "when")


@dataclass
class WorldScores:
    """Per-question results of `evaluate_on_world`.

    Attributes:
        right: for each text question kind, one bool per question.
        wrong: (question, world's answer, generated answer) of each wrong answer.
        moment_iou: one IoU per "when" question.
        ball_share, area_share: per "when" question, the relevance on the ball's patches and their share of all patches.
    """

    right: dict[str, list[bool]] = field(default_factory=lambda: {kind: [] for kind in TEXT_KINDS})
    wrong: list[tuple[str, str, str]] = field(default_factory=list)
    moment_iou: list[float] = field(default_factory=list)
    ball_share: list[float] = field(default_factory=list)
    area_share: list[float] = field(default_factory=list)

    def accuracy(self, kind: str) -> float:
        """Share of right answers to questions of `kind` (0 to 1)."""
        return float(np.mean(self.right[kind]))

    def moments_matching(self, threshold: float = 0.5) -> float:
        """Share of "when" questions whose top moment has an IoU of at least `threshold` with the truth."""
        return float(np.mean([iou >= threshold for iou in self.moment_iou]))

    def table(self) -> str:
        """The scores as a Markdown table."""
        lines = ["| measure | questions | score |", "|---|---|---|"]
        for kind in TEXT_KINDS:
            lines.append(f"| {kind} answer accuracy | {len(self.right[kind])} | {self.accuracy(kind):.1%} |")
        count = len(self.moment_iou)
        lines.append(f"| \"when\": top-moment IoU (mean) | {count} | {np.mean(self.moment_iou):.2f} |")
        lines.append(f"| \"when\": top moments with IoU ≥ 0.5 | {count} | {self.moments_matching():.1%} |")
        ball, area = np.mean(self.ball_share), np.mean(self.area_share)
        lines.append(
            f"| relevance on the ball's patches (vs their share of all patches) | {count} | {ball:.1%} (vs {area:.1%}) |"
        )
        return "\n".join(lines)


def answer_matches(generated: str, answer: str) -> bool:
    """Whether a generated answer says the world's answer (ignoring case, surrounding space and the final period)."""

    def normalise(text: str) -> str:
        return text.strip().rstrip(".").strip().lower()

    return normalise(generated) == normalise(answer)


def interval_iou(first: tuple[float, float], second: tuple[float, float]) -> float:
    """Intersection over union of two time intervals `(start, end)`."""
    overlap = max(0.0, min(first[1], second[1]) - max(first[0], second[0]))
    union = max(first[1], second[1]) - min(first[0], second[0])
    return overlap / union if union > 0 else 0.0


def ball_patch_shares(
    clip: Clip, balls: Sequence[Ball], relevance: torch.Tensor, timestamps: Sequence[float]
) -> tuple[float, float]:
    """(share of a `(frames, rows, columns)` relevance on the patches `balls` cover in the frames at `timestamps`,
    share of all patches those are)."""
    frames, rows, columns = relevance.shape
    covered = np.zeros((frames, rows, columns), bool)
    for ball in balls:
        for index, time in enumerate(timestamps):
            covered[index] |= clip.coverage(ball, time, (rows, columns)) > 0
    return float(relevance.float().numpy()[covered].sum()), float(covered.mean())


@torch.no_grad()
def evaluate_on_world(
    model, processor, clips: Sequence[Clip], question_seed: int = 0, folder: str | Path | None = None
) -> WorldScores:
    """Score `model` on `clips`: each is written as an H.264 file (into `folder`, or a temporary one), asked its
    `questions` (worded from `question_seed`), and scored as the module docstring says."""
    scores = WorldScores()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(folder or scratch)
        for index, clip in enumerate(clips):
            path = str(clip.write(folder / f"clip_{index:04d}.mp4"))
            asked = questions(clip, np.random.default_rng([question_seed, index]))
            text_questions = [question for question in asked if question.kind != "when"]
            for question, generated in zip(text_questions, _answers(model, processor, path, text_questions)):
                right = answer_matches(generated, question.answer)
                scores.right[question.kind].append(right)
                if not right:
                    scores.wrong.append((question.text, question.answer, generated))
            for question in (question for question in asked if question.kind == "when"):
                result = video_relevance(model, processor, path, question.text)
                (ball,) = clip.balls_called(question.referent)
                top = result.top_time_ranges(1)[0]
                scores.moment_iou.append(interval_iou((top.start, top.end), clip.visible_interval(ball)))
                ball_share, area_share = ball_patch_shares(clip, [ball], result.relevance, result.timestamps)
                scores.ball_share.append(ball_share)
                scores.area_share.append(area_share)
    return scores


def evaluate_on_fresh_clips(model, processor, seed: int, count: int) -> WorldScores:
    """`evaluate_on_world` on `count` clips drawn with `seed` (pick one the model was not trained on)."""
    return evaluate_on_world(model, processor, sample_clips(seed, count), question_seed=seed)


def _answers(model, processor, path: str, asked: Sequence[Question]) -> list[str]:
    """Greedy answers to `asked` about one video, generated as a left-padded batch, each pooled under its question."""
    prompts = [render_prompt(processor, BenchmarkPrompt(question.text, question.text)) for question in asked]
    inputs = processor(
        text=prompts, videos=[path] * len(asked), pooling_prompt=[question.text for question in asked],
        padding_side="left",
    ).to(model.device, dtype=model.dtype)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


__all__ = [
    "TEXT_KINDS",
    "WorldScores",
    "answer_matches",
    "ball_patch_shares",
    "evaluate_on_fresh_clips",
    "evaluate_on_world",
    "interval_iou",
]
