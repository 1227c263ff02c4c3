"""docs/architecture.md's layers, checked: a module imports only from its own layer or the layers below it
(function-level imports included), and the leaves import no lensrun module but ``errors``."""

import ast
from pathlib import Path

import lensrun

# Top to bottom, as docs/architecture.md draws them.
LAYERS = {
    "surfaces": {"cli", "api", "gallery", "server", "replicas", "ray_gallery", "webpage", "__main__", "convert"},
    "engine": {"engine", "compile_policy", "parallel"},
    "pipeline": {"pipeline", "step_graph", "background_compile"},
    "memory": {"memory", "placement"},
    "models": {"models", "loading", "single_file", "nvfp4", "configs", "random_checkpoint", "mxfp4", "mxfp4_moe"},
    "kernels": {"acceleration", "attention", "joint_qkv", "prompt_cache"},
    "options": {"request"},
    "leaves": {"prompting", "sampling", "decoding", "errors", "metadata", "transfers", "cuda_graphs"},
}
ROOT = Path(lensrun.__file__).parent


def _imports(path: Path) -> set[str]:
    """The lensrun modules (first name under ``lensrun``) that ``path`` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lensrun":
            parts = node.module.split(".")
            found |= {a.name for a in node.names if a.name != "__version__"} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lensrun.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    placed = set().union(*LAYERS.values())
    assert modules - placed == set(), "place new modules in LAYERS and docs/architecture.md"
    assert placed - modules == set()


def test_imports_only_go_down():
    order = list(LAYERS)
    layer_of = {m: name for name, modules in LAYERS.items() for m in modules}
    wrong = []
    for path in ROOT.rglob("*.py"):
        module = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if module == "__init__":
            continue
        for target in _imports(path) - {module}:
            if order.index(layer_of[target]) < order.index(layer_of[module]):
                wrong.append(f"{path.relative_to(ROOT)} ({layer_of[module]}) imports {target} ({layer_of[target]})")
            elif layer_of[module] == "leaves" and target != "errors":
                wrong.append(f"{path.relative_to(ROOT)} is a leaf but imports {target}")
    assert wrong == []
