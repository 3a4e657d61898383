"""Every third-party package vltrain imports is declared in pyproject.toml, and what is installed (tested) is pinned
in constraints.txt, once, inside the declared range."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _imported_modules() -> dict[str, str]:
    """Top-level module -> first file importing it, over the package and the Hydra plugin."""
    found: dict[str, str] = {}
    for path in sorted([*ROOT.joinpath("vltrain").rglob("*.py"), *ROOT.joinpath("hydra_plugins").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared_and_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    pinned = {_name(line) for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")}
    distributions = metadata.packages_distributions()
    own = {"vltrain", "hydra_plugins"}
    missing, unpinned = [], []
    for module, where in _imported_modules().items():
        if module in own or module in sys.stdlib_module_names or module == "__future__":
            continue
        # an optional package that is not installed here (modelscope) goes by its module name
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} ({where}; distribution {', '.join(sorted(dists))})")
        elif module in distributions and not dists & pinned:  # pinned: what is installed and tested
            unpinned.append(module)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert not unpinned, f"declared but not pinned in constraints.txt: {unpinned}"


def test_runtime_dependencies_are_pinned_once_and_within_their_ranges():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    assert len({r.name for r in runtime}) == len(runtime), "a runtime dependency is listed twice"
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            assert _name(name) not in pins, f"constraints.txt pins {name} twice"
            pins[_name(name)] = version.strip()
    for requirement in runtime:
        name = _name(requirement.name)
        assert name in pins, f"{name} is a runtime dependency but constraints.txt does not pin it"
        version = pins[name].split("+")[0]  # torch's local build tag
        assert requirement.specifier.contains(version), f"constraints.txt pins {name}=={version}, outside {requirement}"
