"""Finding an original PPLLaVA checkpoint and the CLIP/SigLIP model it names, on disk or on the Hugging Face Hub.

The published weights are four folders of one Hub repo (`farewellthree/ppllava_weight`), each written by the original
code's `save_pretrained`: `config.json` (a `llava_next` or `llava_onevision` config plus PPLLaVA's fields), sharded
safetensors with an index, and sometimes the LLM tokenizer. A folder inside a Hub repo is addressed here as
`owner/repo/folder`.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .rules import ConversionError, read_json


PUBLISHED_WEIGHTS_REPO = "farewellthree/ppllava_weight"
# The `clip_weight` of each original layout in the original training configs, for error messages when a checkpoint's
# `clip_weight` is a path on its authors' machines.
ORIGINAL_PROMPT_ENCODERS = {
    "llava_next": "openai/clip-vit-large-patch14-336",
    "llava_onevision": "google/siglip-so400m-patch14-384",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# What a conversion reads from a Hub folder: configs, weights and tokenizer files (vocab/merges, chat templates).
_DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")


@dataclass(frozen=True)
class OriginalCheckpoint:
    """An original checkpoint folder on local disk, where it came from, and its `config.json`."""

    folder: str
    source: str
    config: dict
    repo_id: str | None = None

    @property
    def name(self) -> str:
        """The checkpoint folder's name, e.g. `ppllava_vicuna7b_image_video`."""
        return os.path.basename(os.path.normpath(self.folder))

    @property
    def layout(self) -> str:
        return self.config.get("model_type", "")

    @classmethod
    def resolve(cls, source: str, allow_pickle: bool = False) -> "OriginalCheckpoint":
        """A local folder as is, or `owner/repo[/folder]` downloaded from the Hub (configs, weights, tokenizer files;
        pickle `.bin` weights only with `allow_pickle`). A path that names a local place (see `is_local_path`) is
        never looked up on the Hub."""
        repo_id = None
        folder = source
        if not os.path.isdir(source):
            check_local_source(source, "checkpoint folder")
            repo_id, subfolder = split_hub_path(source)
            prefix = f"{subfolder}/" if subfolder else ""
            patterns = _DOWNLOAD_PATTERNS + (("*.bin",) if allow_pickle else ())
            with hub_errors(source):
                snapshot = snapshot_download(repo_id, allow_patterns=[prefix + pattern for pattern in patterns])
            folder = os.path.join(snapshot, subfolder)
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"{source} has no config.json; is it an original PPLLaVA checkpoint folder?")
        return cls(folder=folder, source=source, config=read_json(config_path), repo_id=repo_id)

    def has_tokenizer(self) -> bool:
        """Whether the folder carries the LLM tokenizer (some published folders do)."""
        return folder_has_tokenizer(self.folder)


def is_local_path(source: str) -> bool:
    """Whether `source` can only mean a place on this machine: it exists, is absolute, starts with `.` or `~`, or
    its first component is a local folder (`checkpoints/ppllava` beside an existing `checkpoints/`). Hub ids
    (`owner/repo[/folder]`) are none of these."""
    first = source.replace(os.sep, "/").split("/")[0]
    return (
        os.path.exists(source)
        or os.path.isabs(source)
        or source.startswith((".", "~"))
        or ("/" in source.replace(os.sep, "/") and os.path.isdir(first))
    )


def check_local_source(source: str, what: str) -> None:
    """Raise `ConversionError` when `source` names a local place (see `is_local_path`) that is not a folder, instead of
    looking it up on the Hub."""
    if not is_local_path(source) or os.path.isdir(source):
        return
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.exists(path):
        raise ConversionError(f"The {what} {source!r} is a file, not a folder: pass the folder that holds it.")
    raise ConversionError(f"The {what} {source!r} does not exist (looked for {path}); check the path.")


@contextmanager
def hub_errors(source: str) -> Iterator[None]:
    """Hub download failures (missing repo or file, no connection: huggingface_hub raises `OSError`s) as a
    `ConversionError` that names `source`."""
    try:
        yield
    except OSError as error:
        reason = next(iter(str(error).strip().splitlines()), "")
        raise ConversionError(
            f"Cannot download {source!r} from the Hugging Face Hub ({type(error).__name__}: {reason}). Check the Hub "
            "id and your connection; a local folder must exist."
        ) from error


def split_hub_path(source: str) -> tuple[str, str]:
    """`owner/repo/sub/folder` -> (`owner/repo`, `sub/folder`); raises `ConversionError` for anything else."""
    parts = source.split("/")
    if len(parts) >= 2 and not source.startswith(("/", ".")) and _is_repo_id("/".join(parts[:2])):
        return "/".join(parts[:2]), "/".join(parts[2:])
    raise ConversionError(f"{source!r} is neither a local folder nor a Hub path owner/repo[/folder].")


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _is_model_id(name: str) -> bool:
    """`owner/name`: every CLIP/SigLIP model on the Hub has an owner (a bare name means a folder)."""
    return name.count("/") == 1 and _is_repo_id(name)


def folder_has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def resolve_prompt_encoder(checkpoint: OriginalCheckpoint, override: str | None = None) -> str:
    """Folder or Hub id of the CLIP/SigLIP model the checkpoint's prompt encoder comes from: `override` when given,
    else the checkpoint's `clip_weight`, a folder relative to the checkpoint (as in the tiny test fixtures), a folder,
    or a Hub id."""
    source = override or checkpoint.config.get("clip_weight")
    hint = ORIGINAL_PROMPT_ENCODERS.get(checkpoint.layout) or " or ".join(ORIGINAL_PROMPT_ENCODERS.values())
    if not source:
        raise ConversionError(f"The checkpoint names no `clip_weight`; pass the prompt encoder (e.g. {hint}).")
    if override is not None:
        check_local_source(source, "prompt encoder")
    else:
        beside = os.path.join(checkpoint.folder, source)
        if os.path.isdir(beside):
            return beside
        if not os.path.isabs(source) and not _is_model_id(source):
            raise ConversionError(
                f"The checkpoint's clip_weight {source!r} names a folder beside the checkpoint, {beside}, which does "
                f"not exist: put the CLIP/SigLIP model folder there, or pass it, e.g. --prompt-encoder {hint}."
            )
    if os.path.isdir(source) or _is_model_id(source):
        return source
    raise ConversionError(
        f"The prompt encoder {source!r} is neither a folder nor a Hub id (original checkpoints may record a path on "
        f"their authors' machines); pass it explicitly, e.g. --prompt-encoder {hint}."
    )


def load_prompt_encoder_config(source: str) -> dict:
    """The `config.json` of a CLIP/SigLIP model folder or Hub id."""
    if os.path.isdir(source):
        path = os.path.join(source, "config.json")
        if not os.path.isfile(path):
            raise ConversionError(f"The prompt encoder folder {source} has no config.json; pass a CLIP/SigLIP model folder.")
    else:
        with hub_errors(source):
            path = hf_hub_download(source, "config.json")
    return read_json(path)
