"""The project's import graph, read with ast (nothing is imported), and the three layout rules on it.

Every ``import``/``from ... import`` counts, at module level or inside a function: a deferred import
still ties the two modules together. A module is known by its dotted name (``latentforge.storage``,
``pipelines.train``, ``jobs.generate``); a package by its ``__init__``. Importing ``a.b.c`` counts
as an edge to ``a.b.c`` only, not to the packages ``a`` and ``a.b`` Python also runs: every
``__init__`` that re-exports its submodules would otherwise close a circle with each of them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Import:
    """One edge: ``source`` imports ``target`` (both project modules) at ``path:line``."""

    source: str
    target: str
    path: str
    line: int
    text: str
    names: tuple[str, ...]
    """The names taken from ``target`` (``from target import a, b``); empty for ``import target``."""

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


@dataclass(frozen=True)
class Attribute:
    """``alias.name`` where ``alias`` is a project module ``target`` imported into ``source``."""

    source: str
    target: str
    name: str
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.target}.{self.name}"


def module_name(root: Path, path: Path, package_roots: dict[str, str]) -> str:
    """``platform/latentforge/x/y.py`` -> ``latentforge.x.y`` (``package_roots`` maps a folder to its package)."""
    rel = path.relative_to(root)
    for folder, package in package_roots.items():
        if rel.parts[:len(Path(folder).parts)] == Path(folder).parts:
            inner = rel.relative_to(folder).with_suffix("").parts
            parts = [package, *inner]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{rel} is under none of {sorted(package_roots)}")


class Graph:
    """The modules under ``package_roots`` (folder relative to ``root`` -> package name) and their imports."""

    def __init__(self, root: Path, package_roots: dict[str, str]) -> None:
        self.root = root
        self.files: dict[str, Path] = {}
        for folder in package_roots:
            for path in sorted((root / folder).rglob("*.py")):
                self.files[module_name(root, path, package_roots)] = path
        self.imports: list[Import] = []
        self.attributes: list[Attribute] = []
        for name, path in self.files.items():
            self._read(name, path)

    def is_package(self, name: str) -> bool:
        return self.files[name].name == "__init__.py"

    def _resolve(self, source: str, module: str | None, level: int) -> str | None:
        """The dotted name a (possibly relative) import names; a script's bare import of a sibling counts."""
        if level:
            base = source.split(".") if self.is_package(source) else source.split(".")[:-1]
            base = base[:len(base) - (level - 1)]
            return ".".join([*base, module] if module else base)
        sibling = ".".join([*source.split(".")[:-1], module or ""])
        if module and "." in source and sibling in self.files and module.split(".")[0] not in self._tops():
            return sibling
        return module

    def _tops(self) -> set[str]:
        return {name.split(".")[0] for name in self.files}

    def _known(self, dotted: str) -> str | None:
        """The longest project module that ``dotted`` names or lies inside; None outside the project."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.files:
                return ".".join(parts[:end])
        return None

    def _read(self, source: str, path: Path) -> None:
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        rel = path.relative_to(self.root).as_posix()
        lines = text.splitlines()
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            for edge, alias in self._edges(source, rel, node, lines):
                self.imports.append(edge)
                if alias:
                    aliases[alias] = edge.target
        imported = {e.target for e in self.imports if e.source == source}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                base = _dotted(node.value)  # `alias.name`, or `pkg.module.name` after `import pkg.module`
                target = aliases.get(base) if base is not None else None
                target = target or (base if base in imported else None)
                if target is not None:
                    self.attributes.append(Attribute(source, target, node.attr, rel, node.lineno))

    def _edges(self, source: str, rel: str, node: ast.AST, lines: list[str]) -> Iterator[tuple[Import, str | None]]:
        """(edge, the local name bound to the target module, if any) for each project module ``node`` imports."""
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            return
        # The statement as written, on one line (ast.get_source_segment re-splits the file per call: slow).
        snippet = " ".join(line.split("#", 1)[0].strip() for line in lines[node.lineno - 1:node.end_lineno])
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = self._known(self._resolve(source, alias.name, 0) or alias.name)
                if target is not None and target != source:
                    bound = alias.asname or (alias.name if "." not in alias.name else None)
                    yield Import(source, target, rel, node.lineno, snippet, ()), bound
        elif isinstance(node, ast.ImportFrom):
            module = self._resolve(source, node.module, node.level)
            if module is None:
                return
            names = []
            for alias in node.names:
                if self._known(f"{module}.{alias.name}") == f"{module}.{alias.name}":
                    yield Import(source, f"{module}.{alias.name}", rel, node.lineno, snippet, ()), alias.asname or alias.name
                else:
                    names.append(alias.name)
            target = self._known(module)
            if names and target is not None and target != source:
                yield Import(source, target, rel, node.lineno, snippet, tuple(names)), None


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of names and attributes; None for anything else (a call, a subscript)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int | None:
    """The index of the layer whose entry is ``module`` or a package above it (the longest entry wins)."""
    best: tuple[int, int] | None = None
    for index, entries in enumerate(layers):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                if best is None or len(entry) > best[1]:
                    best = (index, len(entry))
    return best[0] if best else None


def upward_imports(graph: Graph, layers: list[tuple[str, ...]]) -> list[str]:
    """Each import from a module to one in a higher layer (``layers`` runs low to high); and unplaced modules."""
    problems = [f"{graph.files[m].relative_to(graph.root)}: {m} is in no layer; add it to LAYERS"
                for m in graph.files if layer_of(m, layers) is None]
    for edge in graph.imports:
        low, high = layer_of(edge.source, layers), layer_of(edge.target, layers)
        if low is not None and high is not None and high > low:
            problems.append(f"{edge.where()}  ({edge.source} in layer {low} imports {edge.target} in layer {high})")
    return problems


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    successors: dict[str, set[str]] = {name: set() for name in graph.files}
    for edge in graph.imports:
        successors[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(successors[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(successors):
        if name not in index:
            visit(name)
    return sorted(found)


def cycle_edges(graph: Graph, component: Iterable[str]) -> list[str]:
    """The imports that hold a circle together, as ``file:line: import`` lines."""
    members = set(component)
    return [e.where() for e in graph.imports if e.source in members and e.target in members]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _same_package(source: str, target: str) -> bool:
    return source.rsplit(".", 1)[0] == target.rsplit(".", 1)[0]


def private_imports(graph: Graph) -> list[tuple[str, str, str]]:
    """(importing module, private name, ``file:line: import  (why)``) for each ``from x import _name``,
    ``x._name`` and ``import pkg._mod`` from outside ``pkg``, across modules."""
    problems = [(e.source, n, f"{e.where()}  (private name {n!r} of {e.target})")
                for e in graph.imports for n in e.names if _private(n)]
    problems += [(a.source, a.name, f"{a.where()}  (private name {a.name!r} of {a.target}, used in {a.source})")
                 for a in graph.attributes if _private(a.name) and a.target != a.source]
    problems += [(e.source, e.target.rsplit(".", 1)[-1], f"{e.where()}  (private module {e.target} used outside its package)")
                 for e in graph.imports if _private(e.target.rsplit(".", 1)[-1]) and not _same_package(e.source, e.target)]
    return problems
