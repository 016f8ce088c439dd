"""The project's layers and the import rules between them, in one table (`LAYERS`), and the checker that
reads the import graph from the source and reports what breaks them (`check`).

The README's "For contributors" section shows the same table (`markdown_table()`; a test keeps them
equal). The checker reads every ``import`` / ``from`` statement with `ast` (inside functions and
``if TYPE_CHECKING:`` blocks too, relative imports resolved, ``importlib.import_module("literal")``
calls included) of the files under `SCANNED`, and reports:

- a layer importing a third-party package its row forbids (common and world: no JAX, no PyTorch
  stack; scoring and reference_torch: no JAX);
- a layer importing a layer of the project its row does not allow: a ranked layer imports only
  layers of lower rank (so the model imports nothing of sampling or training, converters nothing of
  sample or train, ...); the layers beside the column name what they may import;
- a module of the project that is in no layer (a new subpackage: add a row);
- an import cycle between layers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

# Third-party packages that must stay out of a layer.
JAX = ("jax", "flax", "optax", "orbax")
JAX_AND_TORCH = (*JAX, "torch", "torchvision", "transformers", "diffusers", "peft", "tensorboardX")


@dataclass(frozen=True)
class Layer:
    modules: tuple[str, ...]  # dotted packages (and everything under them) that make up the layer
    rank: int | None  # place in the JAX column, 0 at the bottom; None: beside the column
    what: str
    also: tuple[str, ...] = ()  # layers it may import besides those of lower rank (the only ones when rank is None)
    forbidden: tuple[str, ...] = ()  # third-party top-level packages it must not import
    exact: bool = False  # `modules` are single modules, not packages (the facade, run_train.py)
    files: str = ""  # how the README names the files of an `exact` layer


# Bottom to top; scoring and reference_torch sit beside the JAX column.
LAYERS: dict[str, Layer] = {
    "common": Layer(("spatialalign_jax.common",), 0, "store layout and I/O, atomic writes, DSR type table; "
                    "stdlib, numpy, yaml, tensorstore only", forbidden=JAX_AND_TORCH),
    "world": Layer(("spatialalign_jax.world",), 1, "numpy-only layer over common", forbidden=JAX_AND_TORCH),
    "dataset": Layer(("spatialalign_jax.dataset",), 1, "the DSR-Dataset prompt generator over common",
                     forbidden=JAX_AND_TORCH),
    "model": Layer(("spatialalign_jax.model",), 2, "the Flax transformer, LoRA, sharding, converted checkpoints"),
    "converters": Layer(("converters",), 3, "weights in and out; `load_transformer`"),
    "sample": Layer(("spatialalign_jax.sample",), 4, "schedule, sampler, `python -m spatialalign_jax.sample`"),
    "train": Layer(("spatialalign_jax.train",), 5, "losses, step, pairs, trainer, run config"),
    "loop": Layer(("spatialalign_jax.loop",), 6, "the stage runner (runs scoring as subprocesses)",
                  also=("scoring",)),
    "facade": Layer(("spatialalign_jax", "spatialalign_jax.losses"), 7,
                    "package root: lazy re-exports, `spatialalign_jax.losses`", exact=True,
                    files="`spatialalign_jax/__init__.py`, `spatialalign_jax/losses.py`"),
    "run_train": Layer(("run_train",), 8, "`python run_train.py`, a consumer", exact=True, files="`run_train.py`"),
    "scoring": Layer(("scoring",), None, "the PyTorch process", also=("common", "world"), forbidden=JAX),
    "reference_torch": Layer(("reference_torch",), None, "the PyTorch reference step", also=("common",),
                             forbidden=JAX),
}

# Where the checked files are, relative to the repository root.
SCANNED = ("spatialalign_jax", "converters", "scoring", "reference_torch", "run_train.py")
# Top-level names of the project: an import under one of them that matches no layer is reported.
PROJECT = ("spatialalign_jax", "converters", "scoring", "reference_torch", "run_train", "benchmarks", "tests")


def allowed(name: str, layers: Mapping[str, Layer] = LAYERS) -> list[str]:
    """The layers ``name`` may import besides itself, bottom to top."""
    layer = layers[name]
    below = [] if layer.rank is None else [n for n, l in layers.items() if l.rank is not None and l.rank < layer.rank]
    return below + [n for n in layer.also if n not in below]


def markdown_table(layers: Mapping[str, Layer] = LAYERS) -> str:
    """The table as the README shows it."""
    rows = ["| rank | layer | modules | may import (of the project) | must not import |", "|---|---|---|---|---|"]
    for name, l in layers.items():
        mods = l.files or ", ".join(f"`{m.replace('.', '/')}/`" for m in l.modules)
        may = ", ".join(allowed(name, layers)) or "nothing"
        rows.append(f"| {'beside' if l.rank is None else l.rank} | {name} | {mods} | {may} | "
                    f"{', '.join(l.forbidden) or '-'} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Violation:
    file: str  # relative to the checked root
    line: int
    statement: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: `{self.statement}`: {self.message} [{self.rule}]"


def layer_of(module: str, layers: Mapping[str, Layer] = LAYERS) -> str | None:
    """The layer a dotted module name belongs to (longest match), or None."""
    best, best_len = None, -1
    for name, layer in layers.items():
        for m in layer.modules:
            hit = module == m or (not layer.exact and module.startswith(m + "."))
            if hit and len(m) > best_len:
                best, best_len = name, len(m)
    return best


def _module_name(root: Path, path: Path) -> tuple[str, str]:
    """(dotted module name, the package its relative imports start from)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _files(root: Path) -> Iterator[Path]:
    for entry in SCANNED:
        path = root / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(tree: ast.AST, package: str) -> Iterator[tuple[ast.stmt | ast.expr, str, str | None]]:
    """(node, imported module, candidate submodule) for every import; absolute names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield node, module, f"{module}.{alias.name}" if alias.name != "*" else None
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and not node.args[0].value.startswith(".")):
            yield node, node.args[0].value, None


def _statement(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 100 else text[:97] + "..."


def check(root: str | Path, layers: Mapping[str, Layer] = LAYERS) -> list[Violation]:
    """Every import of the files under ``root`` that breaks the table's rules (see the module docstring)."""
    root = Path(root)
    out: list[Violation] = []
    edges: dict[tuple[str, str], Violation] = {}  # layer -> layer, with its first import as the example
    for path in _files(root):
        rel = path.relative_to(root).as_posix()
        module, package = _module_name(root, path)
        here = layer_of(module, layers)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        if here is None:
            out.append(Violation(rel, 1, module, "unknown layer",
                                 f"module {module} is in no layer of the table (tests/layering.py LAYERS): add it"))
            continue
        ok = set(allowed(here, layers)) | {here}
        for node, target, candidate in _imports(tree, package):
            where = dict(file=rel, line=node.lineno, statement=_statement(node))
            top = target.split(".")[0]
            if top in layers[here].forbidden:
                out.append(Violation(**where, rule="third-party",
                                     message=f"{here} must not import {top} ({here}: {layers[here].what})"))
                continue
            if top not in PROJECT:
                continue
            there = (candidate and layer_of(candidate, layers)) or layer_of(target, layers)
            if there is None:
                out.append(Violation(**where, rule="unknown layer",
                                     message=f"{target} is in no layer of the table (a stale path, or add a row)"))
                continue
            if there == here:
                continue
            edges.setdefault((here, there), Violation(**where, rule="cycle", message=""))
            if there not in ok:
                a, b = layers[here], layers[there]
                if a.rank is not None and b.rank is not None:
                    out.append(Violation(**where, rule="layer order", message=(
                        f"{here} (layer {a.rank}) imports {there} (layer {b.rank}); a layer imports only "
                        f"layers below it ({', '.join(allowed(here, layers)) or 'none'})")))
                else:
                    out.append(Violation(**where, rule="allowed imports", message=(
                        f"{here} imports {there}; of the project {here} may import only "
                        f"{', '.join(allowed(here, layers)) or 'nothing'}")))
    out.extend(_cycles(edges))
    return out


def _cycles(edges: Mapping[tuple[str, str], Violation]) -> Iterable[Violation]:
    """One violation per cycle of the layer graph: its layers in order, an import of each step."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    reported: set[frozenset[str]] = set()
    for start in sorted(graph):
        # The shortest path from a successor of `start` back to it (breadth-first), if any.
        parents: dict[str, str] = {start: ""}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for a in frontier:
                for b in graph.get(a, ()):
                    if b == start:
                        found = a
                        break
                    if b not in parents:
                        parents[b] = a
                        nxt.append(b)
                if found is not None:
                    break
            frontier = nxt
        if found is None:
            continue
        path = [found]
        while path[-1] != start:
            path.append(parents[path[-1]])
        cycle = list(reversed(path)) + [start]
        key = frozenset(cycle)
        if key in reported:
            continue
        reported.add(key)
        steps = [edges[(a, b)] for a, b in zip(cycle, cycle[1:])]
        first = steps[0]
        via = "; ".join(f"{a} -> {b} at {s.file}:{s.line}" for (a, b), s in zip(zip(cycle, cycle[1:]), steps))
        yield Violation(first.file, first.line, first.statement, "cycle",
                        f"import cycle between layers {' -> '.join(cycle)} ({via})")
