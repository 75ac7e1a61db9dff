"""Kernel module selection: the wanted modules plus their dependencies, in load order.

The Debian kernel package ships no ``modules.dep`` (``depmod`` runs at install
time), so dependencies are read from each module's ``.modinfo`` (``depends=``
and ``softdep=pre:``). A ``modules.dep`` is honoured when present, and one is
written for the chosen subset so the guest can also use ``modprobe``; so is a
``modules.alias`` (each module's ``alias=`` lines), through which busybox
``modprobe`` finds ``fs-overlay`` or ``crypto-crc32c`` when the guest kernel
asks for a module it needs (``request_module``: a first mount of a filesystem).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from guest.image.elf import modinfo
from guest.image.errors import RecipeError

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    """``kernel/fs/fuse/virtiofs.ko`` -> ``virtiofs``; dashes become underscores."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse ``modules.dep``: module path -> paths it depends on."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ValueError(f"bad modules.dep line: {line!r}")
        deps[path.strip()] = rest.split()
    return deps


def parse_softdep_pre(values: Iterable[str]) -> list[str]:
    """Module names after ``pre:`` in ``softdep=`` values (``pre: a b post: c``)."""
    out: list[str] = []
    for value in values:
        mode = ""
        for word in value.split():
            if word.endswith(":"):
                mode = word[:-1]
            elif mode == "pre":
                out.append(word.replace("-", "_"))
    return out


@dataclass
class ModuleIndex:
    """Which modules exist (name -> path relative to the modules dir) and what they need."""

    paths: dict[str, str]
    builtin: frozenset[str] = frozenset()
    depends: dict[str, list[str]] = field(default_factory=dict)
    softdeps: dict[str, list[str]] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    root: Path | None = None

    @classmethod
    def from_modules_dep(cls, text: str, builtin: Iterable[str] = ()) -> ModuleIndex:
        dep = parse_modules_dep(text)
        paths = {module_name(p): p for p in dep}
        depends = {module_name(p): [module_name(d) for d in ds] for p, ds in dep.items()}
        names = frozenset(module_name(b) for b in builtin)
        return cls(paths=paths, builtin=names, depends=depends)

    @classmethod
    def scan(cls, moddir: Path) -> ModuleIndex:
        """Index ``/lib/modules/<version>``; deps come from modules.dep or each .modinfo."""
        builtin_file = moddir / "modules.builtin"
        builtin = (
            frozenset(module_name(p) for p in builtin_file.read_text().split())
            if builtin_file.exists()
            else frozenset()
        )
        dep_file = moddir / "modules.dep"
        if dep_file.exists():
            index = cls.from_modules_dep(dep_file.read_text(), builtin)
            index.root = moddir
            return index
        paths: dict[str, str] = {}
        for ko in sorted((moddir / "kernel").rglob("*.ko*")):
            rel = ko.relative_to(moddir).as_posix()
            paths.setdefault(module_name(rel), rel)
        return cls(paths=paths, builtin=builtin, root=moddir)

    def _info(self, name: str) -> tuple[list[str], list[str]]:
        if name not in self.depends:
            if self.root is None:
                self.depends[name] = []
            else:
                path = self.root / self.paths[name]
                info = modinfo(path.read_bytes(), str(path))
                self.depends[name] = [
                    d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d
                ]
                self.softdeps[name] = parse_softdep_pre(info.get("softdep", []))
                self.aliases[name] = info.get("alias", [])
        return self.depends[name], self.softdeps.get(name, [])

    def resolve(self, wanted: Iterable[str], aliases: Mapping[str, str] | None = None) -> list[str]:
        """Paths of ``wanted`` and everything they need, each after its dependencies.

        Built-in modules are skipped; a soft pre-dependency that is neither a module
        nor built in is looked up in ``aliases`` (e.g. ``crypto_crc32c`` ->
        ``crc32c_generic``) and otherwise ignored; a wanted module
        or hard dependency that does not exist is a ``RecipeError``.
        """
        order: list[str] = []
        state: dict[str, str] = {}
        aliases = aliases or {}

        def visit(name: str, hard: bool, chain: tuple[str, ...]) -> None:
            name = name.replace("-", "_")
            if name not in self.paths and name not in self.builtin and name in aliases:
                name = aliases[name]
            if name in self.builtin or state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise RecipeError(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
            if name not in self.paths:
                if hard:
                    via = f" (needed by {chain[-1]})" if chain else ""
                    raise RecipeError(
                        f"kernel module '{name}'{via} is not in the kernel package: "
                        "fix the module list in guest/image/recipe.py"
                    )
                return
            state[name] = "visiting"
            depends, softdeps = self._info(name)
            for soft in softdeps:
                visit(soft, False, (*chain, name))
            for dep in depends:
                visit(dep, True, (*chain, name))
            state[name] = "done"
            order.append(name)

        for name in wanted:
            visit(name, True, ())
        return [self.paths[n] for n in order]

    def modules_dep(self, selected: Iterable[str]) -> str:
        """A ``modules.dep`` for the selected module paths (for busybox modprobe).

        Each line lists a module's transitive dependencies as kmod writes them:
        every module before the ones it needs, since modprobe loads a line from
        its last entry back.
        """
        lines = []
        for path in selected:
            name = module_name(path)
            loaded_first: list[str] = []
            self._dependencies_first(name, loaded_first)
            deps = [self.paths[d] for d in reversed(loaded_first) if d != name]
            lines.append(f"{path}: {' '.join(deps)}".rstrip())
        return "\n".join(lines) + "\n"

    def modules_alias(self, selected: Iterable[str]) -> str:
        """A ``modules.alias`` for the selected module paths (``alias <pattern> <module>``)."""
        lines = []
        for path in selected:
            name = module_name(path)
            self._info(name)
            lines += [f"alias {alias} {name}" for alias in self.aliases.get(name, [])]
        return "\n".join(lines) + "\n"

    def _dependencies_first(self, name: str, out: list[str]) -> None:
        """Append ``name``'s hard dependencies, each after its own, then ``name``."""
        depends, _ = self._info(name)
        for dep in depends:
            if dep not in out and dep in self.paths:
                self._dependencies_first(dep, out)
        if name not in out:
            out.append(name)
