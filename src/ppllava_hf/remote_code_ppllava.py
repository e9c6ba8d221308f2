"""Hub remote code: a converted folder that loads with `trust_remote_code=True` where ppllava_hf is not installed.

The folder carries copies of the modules that define the config, the models and (when the folder has one) the
processor, found the way transformers finds them (`custom_object_save`: the defining module, then every flat
`from .module import ...` it makes, recursively); `config.auto_map` and `processor_config.json`'s `auto_map` name the
class behind each Auto class. Only flat sibling imports are followed and an absolute `ppllava_hf` import would need the
package, so the copied modules are checked for both.
"""

import ast
import json
import os

from transformers.dynamic_module_utils import custom_object_save, get_imports

from .configuration_ppllava import PPLLaVAConfig
from .modeling_ppllava import PPLLaVAForConditionalGeneration, PPLLaVAModel
from .processing_ppllava import PPLLaVAProcessor
from .video_processing_ppllava import PPLLaVAVideoProcessor


REMOTE_CODE_CLASSES = {
    "AutoConfig": PPLLaVAConfig,
    "AutoModel": PPLLaVAModel,
    "AutoModelForImageTextToText": PPLLaVAForConditionalGeneration,
    "AutoModelForMultimodalLM": PPLLaVAForConditionalGeneration,
}
PROCESSOR_REMOTE_CODE_CLASSES = {"AutoProcessor": PPLLaVAProcessor, "AutoVideoProcessor": PPLLaVAVideoProcessor}
_PACKAGE = __name__.split(".")[0]


def remote_code_auto_map(classes: dict[str, type] = REMOTE_CODE_CLASSES) -> dict[str, str]:
    """`auto_map` entries (`module.Class`, module relative to the folder) for `classes`."""
    return {auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto, cls in classes.items()}


def save_remote_code(folder: str, config: PPLLaVAConfig, with_processor: bool = False) -> list[str]:
    """Copy the config/model code (and, `with_processor`, the processor code) into `folder`; add the classes to
    `config.auto_map` (save the config afterwards) and to the already saved `processor_config.json`.

    Returns the names of the copied files. Raises `RuntimeError` if a copied module imports a sibling in a form that is
    not followed (`from . import x`, `from .sub.x import`, `from ..x import`) or imports the package absolutely: the
    folder would then fail to load without ppllava_hf.
    """
    classes = {**REMOTE_CODE_CLASSES, **(PROCESSOR_REMOTE_CODE_CLASSES if with_processor else {})}
    copied = set()
    for cls in set(classes.values()):
        copied.update(os.path.basename(path) for path in custom_object_save(cls, folder))
    _check_self_contained(folder, copied)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **remote_code_auto_map()}
    if with_processor:
        _add_processor_auto_map(folder)
    return sorted(copied)


def _add_processor_auto_map(folder: str) -> None:
    """Name the processor and its video processor in `processor_config.json`, where `AutoProcessor` looks for them."""
    path = os.path.join(folder, "processor_config.json")
    with open(path, encoding="utf-8") as handle:
        settings = json.load(handle)
    auto_map = remote_code_auto_map(PROCESSOR_REMOTE_CODE_CLASSES)
    settings["auto_map"] = {"AutoProcessor": auto_map["AutoProcessor"]}
    settings["video_processor"]["auto_map"] = {"AutoVideoProcessor": auto_map["AutoVideoProcessor"]}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _check_self_contained(folder: str, copied: set[str]) -> None:
    problems = []
    for name in sorted(copied):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            if relative and (node.level > 1 or not node.module or "." in node.module):
                problems.append(f"{name}:{node.lineno} is not a flat `from .module import ...`, which remote code needs")
        if _PACKAGE in get_imports(path):
            problems.append(f"{name} imports {_PACKAGE} absolutely; use a flat relative import")
    if problems:
        raise RuntimeError("The remote code would not load without ppllava_hf:\n- " + "\n- ".join(problems))
