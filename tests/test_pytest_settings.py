"""The suite's own pytest settings (pyproject.toml) that keep a CI box healthy."""
from __future__ import annotations

import pytest


def test_passing_tests_leave_no_temp_folders(pytestconfig: pytest.Config):
    # ~11 GB of random checkpoints per run: with pytest's default (every folder of the last three runs kept) the
    # CI disk filled up mid-run ("No space left on device" while writing the full-size SD1.5 checkpoint).
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) == 1
