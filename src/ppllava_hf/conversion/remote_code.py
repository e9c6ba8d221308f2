"""Hub remote code: a converted folder that loads with `trust_remote_code=True` where ppllava_hf is not installed.

The model folder `ppllava_hf/models/ppllava/` is the payload: its modules are copied as they are next to the weights,
and `config.auto_map` and `processor_config.json`'s `auto_map` name the class behind each Auto class. The payload's
modules import only each other (flat `from .module import ...`) and installed packages, which is checked before copying.
"""

import ast
import json
import shutil
from pathlib import Path

from ..models.ppllava import configuration_ppllava
from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration, PPLLaVAModel
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from ..models.ppllava.video_processing_ppllava import PPLLaVAVideoProcessor


PAYLOAD_FOLDER = Path(configuration_ppllava.__file__).parent
REMOTE_CODE_CLASSES = {
    "AutoConfig": PPLLaVAConfig,
    "AutoModel": PPLLaVAModel,
    "AutoModelForImageTextToText": PPLLaVAForConditionalGeneration,
    "AutoModelForMultimodalLM": PPLLaVAForConditionalGeneration,
}
PROCESSOR_REMOTE_CODE_CLASSES = {"AutoProcessor": PPLLaVAProcessor, "AutoVideoProcessor": PPLLaVAVideoProcessor}
_PACKAGE = __name__.split(".")[0]


def payload_files() -> list[Path]:
    """The modules of the model folder, which a remote-code checkpoint ships."""
    return sorted(PAYLOAD_FOLDER.glob("*.py"))


def remote_code_auto_map(classes: dict[str, type] = REMOTE_CODE_CLASSES) -> dict[str, str]:
    """`auto_map` entries (`module.Class`, module relative to the folder) for `classes`."""
    return {auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto, cls in classes.items()}


def save_remote_code(folder: str, config: PPLLaVAConfig, with_processor: bool = False) -> list[str]:
    """Copy the model folder's modules into `folder`; add the classes to `config.auto_map` (save the config
    afterwards) and, `with_processor`, to the already saved `processor_config.json`. Returns the copied file names.

    Raises `RuntimeError` if a payload module imports a sibling in a form the Hub loader does not follow
    (`from . import x`, `from .sub.x import`, `from ..x import`), a module that is not in the folder, or the package
    absolutely: the folder would then fail to load without ppllava_hf.
    """
    files = payload_files()
    check_self_contained(files)
    for path in files:
        shutil.copyfile(path, Path(folder) / path.name)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **remote_code_auto_map()}
    if with_processor:
        _add_processor_auto_map(folder)
    return [path.name for path in files]


def _add_processor_auto_map(folder: str) -> None:
    """Name the processor and its video processor in `processor_config.json`, where `AutoProcessor` looks for them."""
    path = Path(folder) / "processor_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    auto_map = remote_code_auto_map(PROCESSOR_REMOTE_CODE_CLASSES)
    settings["auto_map"] = {"AutoProcessor": auto_map["AutoProcessor"]}
    settings["video_processor"]["auto_map"] = {"AutoVideoProcessor": auto_map["AutoVideoProcessor"]}
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_self_contained(files: list[Path]) -> None:
    """Raise `RuntimeError` listing every import of `files` that would not resolve in a folder holding only them."""
    names = {path.stem for path in files}
    problems = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.level > 1 or not node.module or "." in node.module:
                    problems.append(f"{path.name}:{node.lineno} is not a flat `from .module import ...`")
                elif node.module not in names:
                    problems.append(f"{path.name}:{node.lineno} imports .{node.module}, which is not in the folder")
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.append(node.module)
            if any(module.split(".")[0] == _PACKAGE for module in modules):
                problems.append(f"{path.name}:{node.lineno} imports {_PACKAGE} absolutely")
    if problems:
        raise RuntimeError("The remote code would not load without ppllava_hf:\n- " + "\n- ".join(problems))
