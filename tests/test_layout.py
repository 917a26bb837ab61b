"""The package's layout is its architecture (docs/development.md#layout): layers that import only
downward, torch only on the torch side, a family in one file."""

from __future__ import annotations

import ast
from pathlib import Path

import smd_cli
from smd_cli.families import FAMILIES, Family

PACKAGE = Path(smd_cli.__file__).parent
# Bottom to top: a module imports from its own package or one below it, never above.
LAYERS = ("core", "method", "families", "models", "scenes", "engine", "app")
# Where torch, diffusers and transformers may be imported when a module is imported.
TORCH_SIDE = ("method", "models", "engine")
HEAVY = ("torch", "diffusers", "transformers", "peft", "safetensors", "accelerate")


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE).with_suffix("").parts): path for path in PACKAGE.rglob("*.py")}


def _run_time_imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import that runs: blocks under
    `if TYPE_CHECKING:` never do."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                package = child.module == "smd_cli"
                names = [f"{child.module}.{a.name}" for a in child.names] if package else [child.module]
                found.extend((name, top) for name in names)
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return found


def _layer(module: str) -> str | None:
    """The package of an `smd_cli` module (None: a top-level entry point)."""
    parts = module.split(".")
    return parts[0] if len(parts) > 1 else None


def test_the_top_level_holds_only_entry_points_and_layers():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert top == sorted(["__init__.py", "__main__.py", *LAYERS])


def test_no_import_runs_up_a_layer():
    upward = []
    for module, path in _modules().items():
        layer = _layer(module)
        if layer is None:
            continue
        for target, _ in _run_time_imports(path):
            if target.startswith("smd_cli."):
                their = _layer(target.removeprefix("smd_cli."))
                if their is not None and LAYERS.index(their) > LAYERS.index(layer):
                    upward.append(f"{module} imports {target}")
    assert not upward, upward


def test_torch_stays_on_the_torch_side():
    """Nothing outside the torch side imports torch when it is imported; nothing below the torch
    side's users (core, families, scenes: what `smd validate` reads) imports a module that does,
    so that `smd --help`, `smd validate` and the scenes stay instant."""
    modules = _modules()
    heavy_at_import: dict[str, bool] = {}

    def heavy(module: str) -> bool:
        if module not in heavy_at_import:
            heavy_at_import[module] = False  # an import cycle is not heavy by itself
            imports = [t for t, top in _run_time_imports(modules[module]) if top]
            heavy_at_import[module] = any(
                t.split(".")[0] in HEAVY or (t.startswith("smd_cli.") and t.removeprefix("smd_cli.") in modules
                                             and heavy(t.removeprefix("smd_cli.")))
                for t in imports)
        return heavy_at_import[module]

    outside = [m for m in modules if _layer(m) not in TORCH_SIDE]
    direct = [m for m in outside for t, top in _run_time_imports(modules[m]) if top and t.split(".")[0] in HEAVY]
    assert direct == []
    assert [m for m in outside if _layer(m) in ("core", "families", "scenes") and heavy(m)] == []
    assert heavy("engine.pipeline") and heavy("method.sampler")  # the check can fail


def test_a_family_is_one_file_and_a_registry_line():
    files = sorted(p.stem for p in (PACKAGE / "families").glob("*.py") if p.stem not in ("__init__", "base"))
    assert files == sorted(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.__module__ == f"smd_cli.families.{name}" and family.name == name
        assert Family in family.__bases__ and len(family.__mro__) == 3  # composed, never derived from another family
        for fact in ("label", "pipeline", "native_size", "tiny_vae", "activation_bytes", "denoiser_share",
                     "weight_bytes"):
            assert getattr(family, fact) is not None, (name, fact)


def test_the_method_is_cited_from_the_repository():
    cited = [f"{m}: {line.strip()}" for m, p in _modules().items() for line in p.read_text().splitlines()
             if "SPEC" in line]
    assert cited == []
