"""Which of husk's own packages the guest agent needs, read off its import graph.

The initrd carries whole packages (a package's ``__init__`` may resolve names
lazily, by string, so single modules are not enough). Starting from the
agent's package, every ``import`` and ``from ... import`` in every module
(inside functions too) that names a first-party package adds that package,
whose modules are then scanned in turn. A package the guest must never carry
(the host program, the plugins, the image builder itself) is a recipe error
naming the module that imports it, so the guest cannot grow a dependency on
the host by accident.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from guest.image.errors import RecipeError


def _python_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules a source file imports (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            found.add(base)
            # ``from pkg import mod`` may name a submodule
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _owner(name: str, packages: Iterable[str]) -> str | None:
    """The package in ``packages`` that holds module ``name`` (the longest match)."""
    matches = [p for p in packages if name == p or name.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def package_closure(
    root: Path, start: str, candidates: Iterable[str], forbidden: Iterable[str]
) -> list[str]:
    """The first-party packages ``start`` needs, ``start`` included, sorted.

    ``candidates`` are the packages that may be carried (dotted names below
    ``root``); importing a module of a ``forbidden`` package raises RecipeError.
    """
    allowed = list(candidates)
    banned = list(forbidden)
    needed = {start}
    queue = [start]
    while queue:
        package = queue.pop()
        directory = root / package.replace(".", "/")
        for path in _python_files(directory):
            rel = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
            is_package = path.name == "__init__.py"
            module = rel.removesuffix(".__init__")
            for name in imported_modules(path.read_text(), module, is_package):
                bad = _owner(name, banned)
                if bad is not None and _owner(name, allowed) in (None, bad):
                    raise RecipeError(
                        f"{module} imports {name}, but the guest image must not carry "
                        f"{bad}: the agent may import only {', '.join(sorted(allowed))}"
                    )
                owner = _owner(name, allowed)
                if owner is not None and owner not in needed:
                    needed.add(owner)
                    queue.append(owner)
    return sorted(needed)


def package_files(root: Path, packages: Iterable[str]) -> list[tuple[Path, str]]:
    """(host file, path relative to ``root``) of the packages, their parents' ``__init__`` too."""
    out: dict[str, Path] = {}
    for package in packages:
        parts = package.split(".")
        for depth in range(1, len(parts)):
            init = root.joinpath(*parts[:depth], "__init__.py")
            out[init.relative_to(root).as_posix()] = init
        directory = root.joinpath(*parts)
        for path in directory.rglob("*"):
            if "__pycache__" in path.parts or path.is_symlink() or not path.is_file():
                continue
            if path.suffix == ".pyc":
                continue
            out[path.relative_to(root).as_posix()] = path
    return [(path, rel) for rel, path in sorted(out.items())]
