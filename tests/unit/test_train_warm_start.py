"""``vecaf.train.warm_start.choose_init``: when a run may start from the champion, and why not."""

from __future__ import annotations

import pytest

from vecaf.train.warm_start import choose_init

NAMES = ["cat", "dog", "fox"]
CHAMPION = {"arch": "tf_efficientnet_lite0", "pvm": "efficientnet_lite0", "class_names": NAMES, "mode": "head",
            "input_size": [3, 64, 64]}  # fmt: skip
RUN = {"class_names": NAMES, "arch": "tf_efficientnet_lite0", "pvm": "efficientnet_lite0", "input_size": [3, 64, 64]}


def test_matching_champion_is_used():
    choice = choose_init("champion", CHAMPION, mode="head", champion_version="4", **RUN)
    assert choice.warm and choice.used == "champion" and "champion version 4" in choice.reason
    assert choose_init("champion", CHAMPION, mode="full", **RUN).warm  # a head champion can seed a full run


@pytest.mark.parametrize(
    ("change", "mode", "says"),
    [
        ({"class_names": ["cat", "dog"]}, "head", "champion only: none"),
        ({"class_names": ["dog", "cat", "fox"]}, "head", "another label order"),
        ({"arch": "resnet18"}, "head", "has arch 'resnet18'"),
        ({"pvm": "other"}, "head", "has pvm 'other'"),
        ({"input_size": [3, 224, 224]}, "head", "takes inputs [3, 224, 224]"),
        ({"mode": "full"}, "head", "finetuned in 'full' mode"),
    ],
)
def test_mismatching_champion_is_refused_with_a_reason(change, mode, says):
    choice = choose_init("champion", {**CHAMPION, **change}, mode=mode, **RUN)
    assert not choice.warm and choice.used == "base"
    assert says in choice.reason and "base PVM" in choice.reason


def test_new_class_in_the_pool_is_named():
    choice = choose_init("champion", CHAMPION, mode="head", **{**RUN, "class_names": [*NAMES, "owl"]})
    assert not choice.warm and "pool only: ['owl']" in choice.reason


def test_base_no_champion_and_unreadable_champion():
    assert choose_init("base", CHAMPION, mode="head", **RUN).used == "base"
    assert "no champion yet" in choose_init("champion", None, mode="head", **RUN).reason
    choice = choose_init("champion", None, mode="head", champion_error="pickled weights", **RUN)
    assert not choice.warm and "pickled weights" in choice.reason


def test_bad_values_raise():
    with pytest.raises(ValueError, match="training.init must be one of"):
        choose_init("latest", CHAMPION, mode="head", **RUN)
    with pytest.raises(ValueError, match="mode must be"):
        choose_init("champion", CHAMPION, mode="both", **RUN)
