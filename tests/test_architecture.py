"""The layout keeps its promises: no import cycles, the runtime never imports the tooling, no
private name crosses a module boundary, and no file grows past the size a reader can hold."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bn_gpu"
TOOLS = "bn_gpu.tools"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    """{module name: (path, is a package)} of every Python module of bn_gpu (kernels/ apart: device code)."""
    return {_module_name(path): (path, path.name == "__init__.py") for path in PACKAGE.rglob("*.py")}


MODULES = _modules()


def _imports(name: str) -> list:
    """(imported bn_gpu module, imported names or None, line) for every import in `name`, at any depth
    (an import inside a function is a dependency too)."""
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("bn_gpu")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("bn_gpu"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(module, None, node.lineno) for module in submodules]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest:
                found.append((target, rest, node.lineno))
    return found


def _graph() -> dict:
    return {name: sorted({target for target, _, _ in _imports(name) if target in MODULES and target != name})
            for name in MODULES}


def test_the_imports_have_no_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in graph[node]:
            # A package's __init__ importing its own submodules is how a package is assembled,
            # not a dependency back to it.
            if target.startswith(node + ".") and MODULES[node][1]:
                continue
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)
    assert not cycles, cycles


def test_the_runtime_never_imports_the_tooling():
    offenders = [(name, target, line) for name in MODULES
                 if not name.startswith(TOOLS) and name != "bn_gpu.__main__"
                 for target, _, line in _imports(name) if target.startswith(TOOLS)]
    assert not offenders, offenders


def test_using_the_runtime_loads_no_tooling():
    code = ("import sys, torch, bn_gpu\n"
            "m = bn_gpu.BatchNorm2d(3, backend='cpu'); y = m(torch.randn(4, 3, 5, 5, requires_grad=True))\n"
            "y.sum().backward(); bn_gpu.fold_batch_norms(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), "
            "bn_gpu.BatchNorm2d(3)).eval())\n"
            "print(sorted(m for m in sys.modules if m.startswith('bn_gpu.tools')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_no_private_name_crosses_a_module_boundary():
    offenders = []
    for name in MODULES:
        for target, names, line in _imports(name):
            for imported in names or ():
                if imported.startswith("_") and not (imported.startswith("__") and imported.endswith("__")):
                    offenders.append((name, line, f"{target}.{imported}"))
    assert not offenders, offenders


@pytest.mark.parametrize("limit, paths", [
    (450, [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts]),
    (800, list((ROOT / "kernels").rglob("*.py")) + list((ROOT / "kernels").rglob("*.cu*"))),
], ids=["runtime-python", "device-code"])
def test_no_file_outgrows_a_reader(limit, paths):
    assert paths
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in paths}
    assert {p: n for p, n in sizes.items() if n > limit} == {}
