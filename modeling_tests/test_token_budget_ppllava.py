"""Token budget: `plan_video_pooling` gives any number of frames at most `max_visual_tokens` tokens, covering every frame."""

import math

import pytest
import torch
from model_tester import record_pooling_windows

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.models.ppllava.token_counts_ppllava import fit_temporal_windows, plan_video_pooling
from ppllava_hf.testing.tiny import tiny_config


GRID = (24, 24)
KERNEL = STRIDE = (2, 3, 3)
BUDGET = 1024


def budget_plan(num_frames, budget=BUDGET, output_size=None):
    return plan_video_pooling(num_frames, GRID, KERNEL, STRIDE, output_size=output_size, max_visual_tokens=budget)


def test_32_frames_give_1024_tokens_with_the_default_windows():
    plan = budget_plan(32)

    assert plan.num_tokens == 1024
    assert (plan.output_size, plan.kernel, plan.stride) == ((16, 8, 8), (2, 3, 3), (2, 3, 3))


def test_512_frames_stay_within_the_budget_and_use_all_of_it():
    plan = budget_plan(512)

    assert plan.num_tokens == 1024
    assert (plan.output_size, plan.kernel, plan.stride) == ((16, 8, 8), (32, 3, 3), (32, 3, 3))


def test_without_a_budget_the_original_windows_are_kept():
    assert budget_plan(512, budget=None).num_tokens == 256 * 64
    assert budget_plan(33, budget=None).covered_size[0] == 32  # the original drops the odd frame


@pytest.mark.parametrize("budget", [64, 1000, 1024, 2048])
def test_every_length_from_1_to_1024_frames_fits_the_budget(budget):
    for num_frames in range(1, 1025):
        plan = budget_plan(num_frames, budget)
        frames_kernel, frames_stride = plan.kernel[0], plan.stride[0]
        assert plan.num_tokens <= budget, num_frames
        assert 1 <= frames_stride <= frames_kernel <= num_frames, num_frames
        assert plan.covered_size[0] <= num_frames, num_frames
        unbudgeted = budget_plan(num_frames, budget=None)
        if unbudgeted.num_tokens > budget:
            assert plan.covered_size[0] == num_frames, f"{num_frames} frames: the windows must cover every frame"
            assert plan.output_size[1:] == unbudgeted.output_size[1:], "the budget only coarsens time"
            max_slots = budget // (plan.output_size[1] * plan.output_size[2])
            assert frames_kernel <= 2 * math.ceil(num_frames / max_slots), f"{num_frames} frames: windows too long"
        else:
            assert plan == unbudgeted, num_frames


def test_budgeted_windows_are_at_most_twice_an_even_split():
    """The flaw this rule avoids: 47 frames in 16 slots would need windows of 17 frames every 2."""
    for num_frames in range(2, 1025):
        for max_slots in (1, 2, 7, 16, 31, 64):
            if max_slots > num_frames:
                continue
            slots, kernel, stride = fit_temporal_windows(num_frames, max_slots)
            assert 1 <= slots <= max_slots and stride <= kernel
            assert (slots - 1) * stride + kernel == num_frames
            assert kernel <= 2 * math.ceil(num_frames / max_slots)


@pytest.mark.parametrize(
    "num_frames, expected",
    [(47, (15, 5, 3)), (1023, (16, 78, 63)), (512, (16, 32, 32)), (34, (16, 4, 2)), (16, (16, 1, 1))],
)
def test_fit_temporal_windows_examples(num_frames, expected):
    assert fit_temporal_windows(num_frames, 16) == expected


def test_budget_applies_to_output_size_plans_too():
    plan = budget_plan(64, budget=512, output_size=(32, 8, 8))

    assert plan.num_tokens == 512 and plan.covered_size[0] == 64


def test_budget_below_one_pooled_frame_is_an_error():
    with pytest.raises(ValueError, match="smaller than one pooled frame"):
        budget_plan(64, budget=63)


@pytest.mark.parametrize("num_frames", [1, 5, 9, 23])
def test_model_emits_exactly_the_planned_number_of_tokens(num_frames):
    """The model and the processor share `plan_video_pooling`: the token count is the plan's, budget included."""
    torch.manual_seed(0)
    model = PPLLaVAForConditionalGeneration(tiny_config("vicuna", max_visual_tokens=12, btadapter_max_frames=8)).eval().model
    video = torch.randn(num_frames, 3, 84, 84)
    config = model.config

    windows, hook = record_pooling_windows(model)
    with torch.no_grad():
        default = model.get_video_features([video], clip_input_ids=torch.tensor([[5, 6, 7]]))
        per_call = model.get_video_features([video], clip_input_ids=torch.tensor([[5, 6, 7]]), max_visual_tokens=4)
    hook.remove()

    assert len(windows) == 2  # one pooling call per video: the whole clip in one block
    for output, window, budget in ((default, windows[0], 12), (per_call, windows[1], 4)):
        plan = plan_video_pooling(
            num_frames, config.patch_grid, config.video_pooling_kernel, config.video_pooling_stride,
            max_visual_tokens=budget,
        )
        assert window == (plan.kernel, plan.stride)
        assert output.pooler_output[0].shape == (plan.num_tokens, config.text_config.hidden_size)
        assert plan.num_tokens <= budget
