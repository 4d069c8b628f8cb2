"""latentforge.tracking.default_run_name, the one run-name builder every stage uses."""

from __future__ import annotations

import calendar
import re
import time

import pytest

from latentforge.tracking import default_run_name


@pytest.mark.parametrize(("location", "expected"), [
    ("/data/latents", "precompute-latents"),
    ("/data/latents/", "precompute-latents"),  # a trailing slash does not empty the name
    ("/data/latents///", "precompute-latents"),
    ("s3://bucket/runs/laion-256", "precompute-laion-256"),
    ("s3://bucket/runs/laion-256/", "precompute-laion-256"),
    ("latents", "precompute-latents"),  # a relative path with no directory part
])
def test_named_after_the_last_part_of_the_output_location(location, expected) -> None:
    assert default_run_name("precompute", location) == expected


@pytest.fixture
def tokyo_local_time(monkeypatch):
    """Local time 9 h from UTC, so a name stamped in local time would fail."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("location", [None, "", "/"])
def test_without_a_location_named_after_the_utc_time(location, tokyo_local_time) -> None:
    before = int(time.time())
    name = default_run_name("train", location)
    after = time.time()
    match = re.fullmatch(r"train-(\d{8}-\d{6})", name)
    assert match, name
    stamp = calendar.timegm(time.strptime(match.group(1), "%Y%m%d-%H%M%S"))  # read back as UTC
    assert before <= stamp <= after
