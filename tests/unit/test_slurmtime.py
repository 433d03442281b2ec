"""SLURM durations: one parser for specs, one for what SLURM reports, one formatter."""

from __future__ import annotations

import pytest

from hfhpc import slurmtime


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("5:30", 330), ("02:30:00", 9000), ("48:00:00", 172800), ("2-12", 216000),
    ("1-02:30", 95400), ("0-03:00:00", 10800), (" 1-00:00:01 ", 86401),
])
def test_every_sbatch_form_parses(text, seconds):
    assert slurmtime.parse(text) == seconds


@pytest.mark.parametrize("text", ["1-99:99:99", "1-24", "1:60", "1:00:60", "0", "0:00", "x", "1-", "-5", "400-00:00:00", ""])
def test_impossible_limits_are_refused_in_one_line(text):
    with pytest.raises(ValueError) as e:
        slurmtime.parse(text)
    assert "\n" not in str(e.value)


def test_reported_durations_and_words():
    assert slurmtime.parse_reported("00:01:02.345") == 62
    assert slurmtime.parse_reported("05:07") == 307
    assert slurmtime.parse_reported("365-00:00:00") == 365 * 86400
    for word in ("UNLIMITED", "Partition_Limit", "INVALID", ""):
        assert slurmtime.parse_reported(word) is None


@pytest.mark.parametrize("seconds", [1, 59, 3600, 86399, 86400, 90061, 30 * 86400])
def test_format_round_trips(seconds):
    text = slurmtime.format(seconds)
    assert text.count("-") == 1 and slurmtime.parse(text) == seconds


def test_format_rounds_up_to_the_second():
    assert slurmtime.format(0.2) == "0-00:00:01"
