"""The distribution installs one import namespace, `eive_audit`, and nothing else at the top of site-packages.

Generic top-level names (`pipeline`, `storage`, ...) collide with PyPI distributions of those names, which would
overwrite our files on install and delete them on uninstall.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (path,) = out.glob("eive_audit-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_only_the_eive_audit_namespace(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {name for name in top if not name.endswith(".dist-info")} == {"eive_audit"}


def test_every_package_folder_is_listed_and_in_the_wheel_with_the_shipped_models_and_explainers(wheel: zipfile.ZipFile) -> None:
    """setuptools would still copy an unlisted folder as data (with a warning that this becomes an error), so the
    list itself is checked against the folders."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join([*prefix.split("."), *init.relative_to(REPO / folder).parent.parts])
                for prefix, folder in setuptools["package-dir"].items() for init in (REPO / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == packages
    names = set(wheel.namelist())
    assert {package.replace(".", "/") + "/__init__.py" for package in packages} <= names
    assert {f"eive_audit/pipeline/models/{shipped}/{file}" for shipped in ("default", "default_vit")
            for file in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                         "aha/aha.safetensors", "aha/aha_config.json", "aha/README.md")} <= names


def test_the_console_script_is_the_top_layer(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "eive-audit = eive_audit.cli:main" in wheel.read(entry_points).decode()
