"""The dependency rules of docs/architecture.md, checked on the source: every import statement
(module-level or inside a function) of every module, resolved to the module it names."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package, as pyproject.toml maps them
PACKAGES = {"ptychopv": "ptychopv", "ptychopv/commands": "ptychopv.commands", "ptychopv/science": "ptychopv.science",
            "ptychopv/io": "ptychopv.io", "ioc": "ptychopv.ioc", "plugins": "ptychopv.plugins",
            "inference": "ptychopv.inference", "inference/engines": "ptychopv.inference.engines",
            "hpc": "ptychopv.hpc", "opi": "ptychopv.opi"}
EPICS = {"p4p", "softioc", "epics", "caproto", "pvapy", "pvaccess", "epicscorelibs", "epicsdbbuilder", "ophyd"}
APP = {f"ptychopv.{m}" for m in ("cli", "commands", "config", "demo", "procs", "simserver", "simulation",
                                 "fidelity", "__main__")}
SCIENCE_OK = {"numpy", "scipy", "skimage", "__future__"}


def modules():
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            yield name, pkg, path


def imports(name: str, pkg: str, path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}      # "from . import physics" names a module
    return out


def violations(rule):
    bad = []
    for name, pkg, path in modules():
        for imp in imports(name, pkg, path):
            why = rule(name, imp)
            if why:
                bad.append(f"{name} imports {imp}: {why}")
    return bad


def within(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def top(mod: str) -> str:
    return mod.split(".")[0]


def rule(name: str, imp: str) -> str | None:
    if within(name, "ptychopv.science"):
        if top(imp) == "ptychopv" and not within(imp, "ptychopv.science"):
            return "the science library imports only itself"
        if top(imp) in EPICS or top(imp) in {"torch", "ptychi", "h5py"}:
            return "the science library is numpy only"
    if within(name, "ptychopv.io") and within(imp, "ptychopv.inference", "ptychopv.hpc", "ptychopv.plugins",
                                               "ptychopv.ioc", *APP):
        return "transport and files know nothing of the layers above"
    if within(name, "ptychopv.inference", "ptychopv.hpc"):
        if top(imp) in EPICS:
            return "inference and hpc run on an edge box or an HPC node without EPICS"
        if within(imp, "ptychopv.plugins", "ptychopv.ioc", "ptychopv.opi", *APP):
            return "inference and hpc do not import the chain, the IOC or the application"
    if within(name, "ptychopv.inference") and within(imp, "ptychopv.hpc"):
        return "inference does not import hpc (hpc imports inference)"
    if within(name, "ptychopv.plugins"):
        if top(imp) in EPICS - {"p4p"}:
            return "plugins speak PV Access (p4p) only; records are the IOC's"
        if within(imp, "ptychopv.ioc", "ptychopv.hpc", "ptychopv.opi", *APP):
            return "plugins do not import the IOC, hpc or the application"
    if within(name, "ptychopv.ioc") and within(imp, *(APP - {"ptychopv.config"})):
        return "the IOC binds; it does not import the application shell (the config excepted)"
    return None


def test_dependency_rules_hold():
    assert violations(rule) == []


def test_the_rules_catch_a_violation():
    # the checker itself: imports that break a rule are reported
    assert rule("ptychopv.science.physics", "ptychopv.hpc.training")
    assert rule("ptychopv.science.stitching", "p4p.client.thread")
    assert rule("ptychopv.hpc.jobs", "softioc.builder")
    assert rule("ptychopv.inference.engines.base", "ptychopv.ioc.schema")
    assert rule("ptychopv.plugins.source", "softioc")
    assert rule("ptychopv.ioc.chain", "ptychopv.demo")
    assert rule("ptychopv.plugins.source", "p4p.client.thread") is None
    assert rule("ptychopv.ioc.chain", "ptychopv.config") is None


@pytest.mark.parametrize("folder", ["ioc", "plugins", "hpc", "inference"])
def test_pv_names_in_the_binding_are_declared(folder):
    """Every string in ioc/ that looks like one of this IOC's PV names is declared in the schema: a
    misspelled name cannot hide in a literal. The layers it binds name no PV at all (the binding
    does), so there the check is that none is found."""
    import re

    from ptychopv.ioc import schema

    declared = {r.name for r in schema.records()} | {p.name for p in schema.ntndarrays()}
    groups = {n.split(":")[0] for n in declared if ":" in n}     # every declared prefix (Scale: too)
    pattern = re.compile(r"^((%s):[A-Z][A-Za-z0-9]*(_RBV)?|[A-Z][A-Za-z0-9]*_RBV)$" % "|".join(sorted(groups)))
    unknown, found = [], 0
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.match(node.value):
                found += 1
                # an unprefixed literal is a core name (ModelVersion_RBV) or a stage record's
                # suffix (the NDPluginBase set is built from them)
                suffix = ":" not in node.value and any(d.endswith(":" + node.value) for d in declared)
                if node.value not in declared and not suffix:
                    unknown.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert unknown == []
    if folder == "ioc":
        assert found > 100, found             # the guard sees the binding's names
    else:
        assert found == 0, f"{folder}/ names PVs: only the IOC binding should"
