"""The package layout of docs/architecture.md holds in the code: imports run one way (down the layers of its
`layers` block, never between packages of one layer), no import cycle, pycaffe only in the Caffe adapter, and a
lazy import only for the heavy or optional dependencies that keep `clipq --help` fast, each with its reason."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "clipq"
ARCHITECTURE = REPO / "docs" / "architecture.md"
# Imported inside a function, and why: loading them costs a second or more, or they are optional, or
# (numba's kernels) they compile on import; `clipq --help` and the pure-numpy paths do without them.
# onnx and onnxruntime: only `clipq export-onnx` and its checks need them (importing onnx takes about a second);
# ncnn and cv2 (OpenCV): only `clipq doctor`'s runtime checks run the exported models in them.
HEAVY = {"caffe", "numba", "matplotlib", "GPyOpt", "scipy", "ray", "mpi4py", "onnx", "onnxruntime", "ncnn", "cv2"}
LAZY_CLIPQ = {"clipq.quant.kernel", "clipq.storage.kernels"}  # numba kernels
ENTRY = {"clipq.__main__", "clipq.data_parallel"}  # `python -m clipq`, `python -m clipq.data_parallel`


@dataclass(frozen=True)
class Import:
    source: str      # importing module
    target: str      # imported module (a clipq module resolved to its file, else the top-level name)
    lazy: bool       # inside a function
    line: str


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def resolve(node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name if alias.name.startswith("clipq") else alias.name.split(".")[0] for alias in node.names]
    base = node.module or ""
    if not base.startswith("clipq"):
        return [base.split(".")[0]]
    return [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]


def imports() -> list[Import]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source, lines = module_name(path), path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        lazy_nodes = {id(sub) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for sub in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                for target in resolve(node):
                    found.append(Import(source, target, id(node) in lazy_nodes, lines[node.lineno - 1]))
    return found


def layers() -> list[list[str]]:
    """The packages of each layer, top first, from docs/architecture.md's ```layers block."""
    block = re.search(r"```layers\n(.*?)```", ARCHITECTURE.read_text(), re.S)
    assert block, f"{ARCHITECTURE}: no ```layers block"
    return [[f"clipq.{name.strip()}" for name in row.split("|")] for row in block.group(1).strip().splitlines()]


def package_of(module: str, packages: list[str]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def level(module: str) -> tuple[int, str]:
    """(depth of the module's layer, counted from the top, and its package); entry points are above all."""
    rows = layers()
    if module in ENTRY:
        return -1, module
    if module == "clipq":
        return len(rows), module  # the package root (__version__) sits below everything
    for depth, row in enumerate(rows):
        package = package_of(module, row)
        if package:
            return depth, package
    raise AssertionError(f"{module} is in no layer of {ARCHITECTURE.name}")


INTERNAL = [i for i in imports() if i.target.startswith("clipq")]


def test_every_module_is_in_a_layer_of_the_documented_design():
    for module in {module_name(p) for p in PACKAGE.rglob("*.py")}:
        level(module)


def test_imports_run_down_the_layers():
    upward = []
    for edge in INTERNAL:
        (src_depth, src_package), (dst_depth, dst_package) = level(edge.source), level(edge.target)
        if src_package != dst_package and dst_depth <= src_depth:
            upward.append(f"{edge.source} imports {edge.target} ({edge.line.strip()}): {dst_package} is not below "
                          f"{src_package}")
    assert not upward, "imports against docs/architecture.md's layers:\n" + "\n".join(upward)


def test_there_is_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for edge in INTERNAL:
        graph.setdefault(edge.source, set()).add(edge.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]) \
                if nxt in path else f"import cycle through {nxt}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_only_the_caffe_adapter_imports_pycaffe():
    outside = [f"{i.source}: {i.line.strip()}" for i in imports() if i.target == "caffe"
               and package_of(i.source, ["clipq.caffe"]) is None]
    assert not outside


def test_lazy_imports_are_heavy_dependencies_with_a_reason():
    bad = [f"{i.source}: {i.line.strip()}" for i in imports() if i.lazy and not (
        (i.target in HEAVY or i.target in LAZY_CLIPQ) and "#" in i.line)]
    assert not bad, "import inside a function without a heavy dependency and a `# reason`:\n" + "\n".join(bad)
