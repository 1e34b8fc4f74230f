"""conftest.HEAVY_FIRST names the suite's long work units so that xdist starts them first; a renamed test
would silently drop out of that order and start last on one worker while the other idles."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import HEAVY_FIRST

TESTS = Path(__file__).resolve().parent


def test_every_heavy_unit_names_a_test_function_or_an_xdist_group() -> None:
    source = "\n".join(path.read_text() for path in TESTS.glob("test_*.py"))
    functions = set(re.findall(r"^def (test_\w+)\(", source, flags=re.MULTILINE))
    groups = set(re.findall(r"xdist_group\(\s*[\"']([\w-]+)[\"']", source))
    assert groups, "the pattern finds the suite's xdist groups"
    assert [unit for unit in HEAVY_FIRST if unit not in functions | groups] == []
