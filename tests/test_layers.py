"""
The package's import graph goes one way: each module imports only from
layers below its own (imports for type checking alone aside), so a module
can be read, tested and replaced with only what is under it in mind.  A new
module must be given its layer here.
"""

import ast
from pathlib import Path

import wsgw

#: Bottom first.  Modules of one layer do not import each other, except
#: where a layer is a package (the cluster engine's parts).
LAYERS = [
    ["wsgw.interfaces", "wsgw.jsonio", "wsgw.internals", "wsgw.config", "wsgw.access"],
    ["wsgw.registry", "wsgw.appagent", "wsgw.tls"],
    ["wsgw.events", "wsgw.identity", "wsgw.admission"],
    ["wsgw.connect", "wsgw.online"],
    ["wsgw.forwarder"],
    ["wsgw.gateway"],
    ["wsgw.websocket", "wsgw.eventpost", "wsgw.api", "wsgw.apiserver", "wsgw.health", "wsgw.metrics"],
    ["wsgw.cluster.wire", "wsgw.cluster.redislink"],
    ["wsgw.cluster.node", "wsgw.cluster.online"],
    ["wsgw.cluster"],
    ["wsgw.web"],
    ["wsgw.router"],
    ["wsgw.service"],
    ["wsgw.systemd", "wsgw.cli"],
    ["wsgw.tap", "wsgw"],
]


def imports(path: Path, name: str) -> set:
    """The wsgw modules C{path} imports at run time (not under TYPE_CHECKING)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.startswith("wsgw"):
                    if child.module:  # "from . import x" imports x alone
                        found.add(module)
                    for alias in child.names:
                        found.add(f"{module}.{alias.name}")
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("wsgw"))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def modules() -> dict:
    root = Path(wsgw.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def test_every_module_has_a_layer():
    placed = {m for layer in LAYERS for m in layer}
    assert sorted(set(modules()) - placed) == []


def test_no_module_imports_upward_or_sideways():
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    known = modules()
    wrong = []
    for name, path in known.items():
        for target in imports(path, name) & set(known):
            if target != name and rank[target] >= rank[name] and not target.startswith(name + "."):
                wrong.append(f"{name} (layer {rank[name]}) imports {target} (layer {rank[target]})")
    assert wrong == []
