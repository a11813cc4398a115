"""One build of runtime/cpp per test session, shared by every test file under tests/cpp/."""

from __future__ import annotations

import pytest

from tests.cpp.cppbuild import Build, make_build


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Build:
    return make_build(tmp_path_factory)
