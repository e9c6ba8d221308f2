"""Which parts of PPLLaVA learn: the original recipes' freezing presets and a table of trainable parameters per part.

The original decides with three switches in `LlavaInterleave.from_config` (`freeze_LLM`, `freeze_vision_tower`,
`onlyLLM`); its released configs use two settings, named here after the stage they serve:

- `"dpo"` (`config/dpo/*.yaml`, `onlyLLM: True`): the language model and `lm_head` learn, everything else is frozen.
- `"sft"` (`config/vicuna/*.yaml`, `config/qwen/*.yaml`: `freeze_LLM: False`, `freeze_vision_tower` left on): the
  vision tower is frozen; its BT-Adapter, the prompt alignment heads, the projector, the language model, `lm_head` and
  `image_newline` learn. The prompt encoder learns only where the config runs it with gradient
  (`freeze_prompt_encoder=False`, the SigLIP recipe); the CLIP recipe runs it without gradient, so it stays frozen.

Apply a preset before wrapping the language model with peft: LoRA then freezes the base weights it adapts by itself.
"""

from dataclasses import dataclass

from torch import nn

from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration, PPLLaVAModel


VISION_TOWER = "vision tower"
BTADAPTER = "BT-Adapter"
PROMPT_ENCODER = "prompt encoder"
PROMPT_ALIGNMENT = "prompt alignment"
PROJECTOR = "projector"
LANGUAGE_MODEL = "language model"
LM_HEAD = "lm_head"
IMAGE_NEWLINE = "image_newline"
OTHER = "other"

PARAMETER_GROUPS = (
    VISION_TOWER, BTADAPTER, PROMPT_ENCODER, PROMPT_ALIGNMENT, PROJECTOR, LANGUAGE_MODEL, LM_HEAD, IMAGE_NEWLINE
)

FREEZING_PRESETS: dict[str, str] = {
    "dpo": "only the language model and lm_head learn (the released DPO recipe, `onlyLLM`)",
    "sft": (
        "everything but the vision tower learns, its BT-Adapter included; the prompt encoder learns only if the config "
        "runs it with gradient (freeze_prompt_encoder=False, the SigLIP recipe)"
    ),
}


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of a PPLLaVA model (or anything holding one, e.g. a peft wrapper) by part, each counted once.

    Parts: vision tower, BT-Adapter, prompt encoder (the CLIP/SigLIP text model), prompt alignment (its projections,
    visual layernorm and per-patch head), projector, language model, lm_head, image_newline; parameters of none of them
    fall under "other".
    """
    core = _find(model, PPLLaVAModel)
    head = _find(model, PPLLaVAForConditionalGeneration)
    alignment = core.prompt_alignment
    prompt_encoder = set(map(id, alignment.text_model.parameters()))
    members = {
        VISION_TOWER: list(core.vision_tower.parameters()),
        BTADAPTER: list(core.btadapter.parameters()) if core.btadapter is not None else [],
        PROMPT_ENCODER: list(alignment.text_model.parameters()),
        PROMPT_ALIGNMENT: [p for p in alignment.parameters() if id(p) not in prompt_encoder],
        PROJECTOR: list(core.multi_modal_projector.parameters()),
        LANGUAGE_MODEL: list(core.language_model.parameters()),
        LM_HEAD: list(head.lm_head.parameters()) if head is not None else [],
        IMAGE_NEWLINE: [core.image_newline],
    }
    seen: set[int] = set()
    groups: dict[str, list[nn.Parameter]] = {}
    for name, params in members.items():
        groups[name] = [p for p in params if id(p) not in seen]
        seen.update(map(id, params))
    groups[OTHER] = [p for p in model.parameters() if id(p) not in seen]
    return groups


def check_freezing_preset(preset: str) -> None:
    """Refuse an unknown preset name, listing the known ones."""
    if preset not in FREEZING_PRESETS:
        presets = "; ".join(f"{name!r}: {description}" for name, description in FREEZING_PRESETS.items())
        raise ValueError(f"Unknown freezing preset {preset!r}. Presets: {presets}.")


def _trainable_groups(preset: str, model: nn.Module) -> frozenset[str]:
    """The parts a preset trains on this model (the SFT preset reads the model's `freeze_prompt_encoder`)."""
    check_freezing_preset(preset)
    if preset == "dpo":
        return frozenset({LANGUAGE_MODEL, LM_HEAD})
    frozen = {VISION_TOWER}
    if _find(model, PPLLaVAModel).config.freeze_prompt_encoder:
        frozen.add(PROMPT_ENCODER)
    return frozenset(PARAMETER_GROUPS) - frozen


def apply_freezing_preset(model: nn.Module, preset: str) -> "TrainableParameterTable":
    """Set `requires_grad` on every parameter of a PPLLaVA model as the preset says (see `FREEZING_PRESETS`); returns
    the resulting trainable-parameter table. Parameters outside the known parts are frozen, and so are quantized
    weights (4-bit / 8-bit integers cannot learn; LoRA adapters learn for them)."""
    trainable = _trainable_groups(preset, model)
    for name, params in parameter_groups(model).items():
        for param in params:
            param.requires_grad_(name in trainable and param.is_floating_point())
    return trainable_parameter_table(model)


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of one part."""

    group: str
    trainable: int
    total: int


@dataclass(frozen=True)
class TrainableParameterTable:
    """Trainable and total parameter counts per part of a PPLLaVA model; `str()` renders it for a terminal."""

    rows: tuple[ParameterCount, ...]

    @property
    def trainable(self) -> int:
        return sum(row.trainable for row in self.rows)

    @property
    def total(self) -> int:
        return sum(row.total for row in self.rows)

    def __str__(self) -> str:
        lines = [f"{'part':<18}{'trainable':>16}{'total':>16}{'share':>8}"]
        for row in (*self.rows, ParameterCount("all", self.trainable, self.total)):
            share = f"{100 * row.trainable / row.total:.1f}%" if row.total else "-"
            if row.group == "all":
                lines.append("-" * len(lines[0]))
            lines.append(f"{row.group:<18}{row.trainable:>16,}{row.total:>16,}{share:>8}")
        return "\n".join(lines)


def trainable_parameter_table(model: nn.Module) -> TrainableParameterTable:
    """Trainable / total parameters per part of a PPLLaVA model (parts as in `parameter_groups`, "other" if any)."""
    rows = tuple(
        ParameterCount(name, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        for name, params in parameter_groups(model).items()
        if name != OTHER or params
    )
    return TrainableParameterTable(rows)


def _find(model: nn.Module, cls: type[nn.Module]) -> nn.Module | None:
    found = next((module for module in model.modules() if isinstance(module, cls)), None)
    if found is None and cls is PPLLaVAModel:
        raise TypeError(f"{type(model).__name__} holds no PPLLaVAModel; freezing presets apply to PPLLaVA models.")
    return found


__all__ = [
    "FREEZING_PRESETS",
    "PARAMETER_GROUPS",
    "TrainableParameterTable",
    "apply_freezing_preset",
    "check_freezing_preset",
    "parameter_groups",
    "trainable_parameter_table",
]
