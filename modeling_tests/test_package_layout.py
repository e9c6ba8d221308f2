"""The package layout: library code never depends on the test helpers, and the model folder stands alone."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ppllava_hf"


def imported_modules(path: Path) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved against its package)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            modules.add(".".join([*base, *([node.module] if node.module else [])]))
    return modules


@pytest.mark.parametrize("folder", ["models", "conversion", "training", "evaluation"])
def test_library_code_never_imports_the_test_helpers(folder):
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(module for module in imported_modules(path) if "ppllava_hf.testing" in module)
        for path in (PACKAGE / folder).rglob("*.py")
    }
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_the_model_folder_holds_only_the_remote_code_payload():
    names = {path.name for path in (PACKAGE / "models" / "ppllava").iterdir() if path.name != "__pycache__"}
    assert names == {
        "__init__.py",
        "configuration_ppllava.py",
        "input_checks_ppllava.py",
        "modeling_ppllava.py",
        "processing_ppllava.py",
        "token_counts_ppllava.py",
        "transformers_internals_ppllava.py",
        "video_decoding_ppllava.py",
        "video_processing_ppllava.py",
    }
