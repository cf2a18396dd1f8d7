"""The champion history and the choice of a rollback target (``tasks.registry``, pure functions)."""

from __future__ import annotations

import pytest

from tasks.registry import format_history, parse_history, rollback_target


def test_history_ends_with_the_current_champion():
    assert parse_history(None, None) == []
    assert parse_history(None, "4") == ["4"]  # a champion set before the tag existed
    assert parse_history("1, 2,3", "3") == ["1", "2", "3"]
    assert parse_history("1,2", "5") == ["1", "2", "5"]  # moved by hand: appended


def test_rollback_goes_one_step_back_each_time():
    target, history = rollback_target(["1", "2", "3"])
    assert (target, history) == ("2", ["1", "2"])
    target, history = rollback_target(history)
    assert (target, history) == ("1", ["1"])
    with pytest.raises(ValueError, match="no earlier champion"):
        rollback_target(history)


def test_rollback_skips_entries_equal_to_the_current_champion():
    assert rollback_target(["1", "3", "2", "3"]) == ("2", ["1", "3", "2"])
    assert rollback_target(["2", "3", "3"]) == ("2", ["2"])
    with pytest.raises(ValueError, match="version 3 is the only champion"):
        rollback_target(["3", "3"])


def test_move_to_version_appends_it():
    assert rollback_target(["1", "2"], to_version="7") == ("7", ["1", "2", "7"])
    assert rollback_target(["1", "2"], to_version=1) == ("1", ["1", "2", "1"])
    with pytest.raises(ValueError, match="already is the champion"):
        rollback_target(["1", "2"], to_version="2")


def test_no_champion_is_a_clear_error():
    with pytest.raises(ValueError, match="no champion yet"):
        rollback_target([])
    with pytest.raises(ValueError, match="no champion yet"):
        rollback_target([], to_version="3")


def test_history_tag_keeps_the_newest_entries_within_mlflow_limits():
    history = [str(v) for v in range(1, 3000)]
    text = format_history(history)
    assert len(text) <= 5000 and text.endswith(",2999") and not text.startswith("1,")
    assert format_history(["1", "2"]) == "1,2"
