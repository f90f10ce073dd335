"""Fixtures of the fast-path tests (helpers are in tests/_fast.py)."""
from __future__ import annotations

import pytest

import gbsd_core


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def fresh(responsive_ckpt):
    """A new bundle per call (accelerate() changes a bundle for good) of a model where a wrong context or a precision
    loss shows in the image (conftest.py)."""
    return lambda: gbsd_core.load(responsive_ckpt)


@pytest.fixture(scope="module")
def plain(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)
