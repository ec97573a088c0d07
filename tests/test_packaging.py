"""The package as a library: every third-party import declared, ranges that hold the tested set,
and a requires-python that every pinned package allows and none needs higher."""
import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PINS = {canonicalize_name(name): version for name, version in
        re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", (ROOT / "constraints.txt").read_text(), re.M)}


def declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    reqs += [Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != "d2dmoe"}


def imported_top_names(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {p.stem for p in folder.glob("*.py")}  # the experiments' scripts import each other
    return names - set(sys.stdlib_module_names) - local - {"d2dmoe", "tests", "__future__"}


def test_every_imported_package_is_declared():
    distributions = metadata.packages_distributions()
    wanted = declared()
    undeclared = []
    for name in sorted(imported_top_names(ROOT / "src") | imported_top_names(ROOT / "experiments")):
        dists = {canonicalize_name(d) for d in distributions.get(name, [name])}
        if not dists & set(wanted):
            undeclared.append(f"{name} (from {sorted(dists)})")
    assert not undeclared, f"imported but not in pyproject.toml's dependencies or extras: {undeclared}"


def test_the_tested_set_lies_in_the_declared_ranges():
    outside = [f"{name}=={PINS[name]} not in {req.specifier}" for name, req in declared().items()
               if name in PINS and not req.specifier.contains(PINS[name], prereleases=True)]
    missing = [name for name in declared() if name not in PINS]
    assert not outside and not missing, (outside, missing)


def test_requires_python_is_what_the_pinned_packages_allow():
    floor = re.fullmatch(r">=(\d+\.\d+)", PROJECT["requires-python"]).group(1)
    below = f"{floor.split('.')[0]}.{int(floor.split('.')[1]) - 1}"
    needs = {}
    for name in PINS:
        try:
            spec = metadata.metadata(name).get("Requires-Python")
        except metadata.PackageNotFoundError:
            continue
        if spec:
            needs[name] = SpecifierSet(spec)
    refused = [f"{n} ({s})" for n, s in needs.items() if not s.contains(f"{floor}.0")]
    assert not refused, f"requires-python >={floor}, but these pinned packages refuse {floor}: {refused}"
    assert any(not s.contains(f"{below}.0") for s in needs.values()), (
        f"no pinned package needs {floor}: requires-python could be lower")
    assert sys.version_info >= tuple(map(int, floor.split(".")))
