"""The import graph: no cycle between the project's modules (function-level and TYPE_CHECKING imports
included, and the package `__init__` every import runs), the layer rules of the design card, and light
entry points (the config, the explainer registry and the CLI load neither torch, transformers nor Prefect)."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Layer -> the layers it may import besides itself (a layer covers its sub-layers: "pipeline" holds
# "pipeline.models"). "cli" is eive_audit.cli and `python -m eive_audit`.
ALLOWED = {
    "cli": {"flows", "pipeline", "explainers", "storage", "reports"},
    "flows": {"pipeline", "explainers", "storage", "reports"},
    # a stored map lies on its image by the one geometry op; an image file is read by the one decoder; a run's
    # diff is judged by the --fail-on grammar the config defines (and validates)
    "reports": {"storage", "pipeline.geometry", "pipeline.sources.decode", "pipeline.config"},
    "explainers": {"pipeline.models", "pipeline.config"},
    "pipeline": {"pipeline.models", "pipeline.config", "pipeline.geometry", "pipeline.sources.decode"},
    "pipeline.geometry": {"pipeline.models"},  # for a type only
    "pipeline.config": {"pipeline.models"},  # no torch there: tested below
    "pipeline.models": set(),
    "pipeline.sources.decode": set(),
    "storage": set(),
}
ONE_PIPELINE_TO_STORAGE = ("eive_audit.pipeline.config", "eive_audit.storage.schema")


def _modules() -> dict[str, Path]:
    """Module name -> source file, by pyproject's package-dir mapping."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in mapping.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path], packages: bool) -> set[str]:
    """The project modules `name` imports anywhere in its source; with `packages`, also the packages each
    import runs first (but `name`'s own, already loading when it runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            parents = {".".join(parts[:i]) for i in range(1, len(parts))} if packages else set()
            found |= ({target} | {p for p in parents if not name.startswith(p + ".")}) & set(modules)
    return found - {name}


def _graph(packages: bool = True) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, packages) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("cli", "__main__"):
        return "cli"
    if parts[:3] == ["pipeline", "sources", "decode"]:
        return "pipeline.sources.decode"
    if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in ("models", "config", "geometry"):
        return f"pipeline.{parts[1]}"
    return parts[0]


def _covers(layers: set[str], layer: str) -> bool:
    return any(layer == a or layer.startswith(f"{a}.") for a in layers)


def test_the_graph_covers_the_project() -> None:
    graph = _graph()
    assert {"eive_audit.cli", "eive_audit.pipeline.config", "eive_audit.explainers.base",
            "eive_audit.pipeline.models.detr", "eive_audit.flows.audit"} <= set(graph)
    assert "eive_audit.pipeline.models.hooks" in graph["eive_audit.pipeline.models.deformable"]
    assert "eive_audit.flows.audit" in graph["eive_audit.cli"], "function-level imports count"


def test_no_import_cycle_between_modules() -> None:
    try:
        order = list(graphlib.TopologicalSorter(_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert order


def test_imports_go_one_way_between_layers() -> None:
    wrong = []
    for module, imported in _graph(packages=False).items():
        own = _layer(module)
        for target in imported:
            layer = _layer(target)
            if layer == own or _covers(ALLOWED[own], layer) or (module, target) == ONE_PIPELINE_TO_STORAGE:
                continue
            wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layer rules:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("module", ["eive_audit.pipeline.config", "eive_audit.explainers", "eive_audit.cli",
                                    "eive_audit.pipeline.models.families", "eive_audit.pipeline.models.locate"])
def test_light_modules_load_no_torch_transformers_or_prefect(module: str) -> None:
    code = (f"import sys, {module}; heavy = sorted({{'torch', 'transformers', 'prefect'}} & set(sys.modules)); "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing {module} loads {done.stdout.strip()}"


def test_the_flows_load_prefect_s_server_only_where_they_may_start_it() -> None:
    """Prefect's server module costs seconds to import: a process reporting to a server (PREFECT_API_URL: a
    user's server, a Dask or Ray worker of a run) never starts the ephemeral one, so it does not load it."""
    import os

    code = "import sys, eive_audit.flows.runners; print('prefect.server.api.server' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    loaded = [subprocess.run([sys.executable, "-c", code], env=extra, capture_output=True, text=True, timeout=300)
              for extra in (env, {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"})]
    assert all(done.returncode == 0 for done in loaded), [done.stderr[-2000:] for done in loaded]
    assert [done.stdout.strip() for done in loaded] == ["True", "False"]
