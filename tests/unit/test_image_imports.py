"""The initrd carries exactly the husk packages the agent's import graph reaches."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from guest.image import imports, recipe, rootfs
from guest.image.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]


def test_the_agent_needs_its_own_package_the_protocols_ttrpc_and_common() -> None:
    needed = imports.package_closure(
        ROOT, recipe.AGENT_PACKAGE, recipe.CARRIED_PACKAGES, recipe.NEVER_CARRIED
    )
    assert needed == ["agent_proto", "common", "guest.agent", "ttrpc"]


def test_an_agent_import_of_the_host_program_is_a_recipe_error(tmp_path: Path) -> None:
    agent = tmp_path / "guest" / "agent"
    agent.mkdir(parents=True)
    (tmp_path / "guest" / "__init__.py").write_text("")
    (agent / "__init__.py").write_text("")
    (agent / "helper.py").write_text("def f():\n    from shim.errors import HuskError\n")
    with pytest.raises(RecipeError, match=r"guest.agent.helper imports shim.errors"):
        imports.package_closure(tmp_path, "guest.agent", ["guest.agent"], ["shim"])


def test_relative_imports_are_resolved() -> None:
    found = imports.imported_modules("from . import b\nfrom ..c import d\n", "p.q.a", False)
    assert found >= {"p.q", "p.q.b", "p.c", "p.c.d"}


def test_every_agent_module_imports_from_the_image_files_alone(tmp_path: Path) -> None:
    tree = tmp_path / "husk"
    for src, rel in rootfs.husk_source_files(ROOT):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tree / rel)
    modules = sorted(
        p.relative_to(tree).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for p in tree.rglob("*.py")
        if p.name != "generate.py"  # agent_proto's regeneration tool runs on a host only
    )
    assert "guest.agent.__main__" in modules and "shim.errors" not in modules
    # -S: no site, so neither the editable install's path hook nor the checkout is
    # importable; only the copied tree and the third-party distributions are.
    code = (
        "import importlib, sys; "
        f"sys.path[:0] = [{str(tree)!r}, {sysconfig.get_paths()['purelib']!r}]; "
        f"[importlib.import_module(m) for m in {modules!r}]; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'shim', 'plugins'}))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
