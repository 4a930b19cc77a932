"""The promotion gate's decision from evaluation results pooled over sets, and the rule an
upload's override makes of the settings'."""

from __future__ import annotations

from typing import Any

from store.evaluations import GateRule
from worker.gate import decide


def result(old: tuple[int, int, int | None], new: tuple[int, int]) -> dict[str, Any]:
    """(images, correct, parent correct) of the old classes; (images, correct) of the new."""
    return {
        "old": {"images": old[0], "correct": old[1], "parent_correct": old[2]},
        "new": {"images": new[0], "correct": new[1], "parent_correct": 0},
    }


def test_no_rule_passes_everything() -> None:
    decision = decide(GateRule(), [result((10, 0, 10), (10, 0))])
    assert decision.passed and decision.reasons == () and decision.note(3) is None


def test_old_drop_and_new_accuracy_are_pooled_over_sets() -> None:
    rule = GateRule(max_old_drop=10, min_new_accuracy=70)
    # 40 of 40 right before, 34 now (15 points down); 18 of 20 new right (90%).
    sets = [result((20, 20, 20), (10, 10)), result((20, 14, 20), (10, 8))]
    decision = decide(rule, sets)
    assert not decision.passed and decision.old_accuracy == 85.0
    assert decision.new_accuracy == 90.0 and len(decision.reasons) == 1
    assert "dropped 15.0 points" in decision.reasons[0]
    note = decision.note(7)
    assert note is not None and "version 7 was published but not activated" in note
    assert decide(GateRule(max_old_drop=15, min_new_accuracy=90), sets).passed
    failing_new = decide(GateRule(min_new_accuracy=95), sets)
    assert not failing_new.passed and "new classes is 90.0%" in failing_new.reasons[0]


def test_what_cannot_be_measured_does_not_refuse() -> None:
    rule = GateRule(max_old_drop=0, min_new_accuracy=100)
    first_version = decide(rule, [result((0, 0, None), (0, 0))])
    assert first_version.passed and len(first_version.unmeasured) == 2
    assert decide(rule, []).passed


def test_an_upload_overrides_only_what_it_sets() -> None:
    settings = GateRule(max_old_drop=5, min_new_accuracy=80)
    assert settings.overridden_by(None) == settings
    assert settings.overridden_by({"max_old_drop": 100}) == GateRule(100, 80)
    assert GateRule.from_json(settings.as_json()) == settings
