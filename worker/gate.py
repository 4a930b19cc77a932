"""The promotion gate: whether a newly learned version may become active, from its
evaluation results (`worker.evaluation`) pooled over every evaluation set."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from store.evaluations import GateRule
from worker.settings import WorkerSettings


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    # Why it failed (empty when it passed), and what could not be measured.
    reasons: tuple[str, ...]
    unmeasured: tuple[str, ...]
    rule: GateRule
    old_accuracy: float | None
    parent_old_accuracy: float | None
    new_accuracy: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "unmeasured": list(self.unmeasured),
            "rule": self.rule.as_json(),
            "old_accuracy": self.old_accuracy,
            "parent_old_accuracy": self.parent_old_accuracy,
            "new_accuracy": self.new_accuracy,
        }

    def note(self, version_id: int) -> str | None:
        """What the job says when the gate kept its version from becoming active."""
        if self.passed:
            return None
        return (
            f"version {version_id} was published but not activated: the promotion gate "
            f"refused it ({'; '.join(self.reasons)}). The active version is unchanged; "
            f"activate version {version_id} by hand (POST /versions/{version_id}/activate) "
            "to serve it anyway"
        )


def gate_rule(settings: WorkerSettings, override: Mapping[str, Any] | None) -> GateRule:
    """The settings' rule with an upload's override applied."""
    rule = GateRule(settings.gate_max_old_drop, settings.gate_min_new_accuracy)
    return rule.overridden_by(override)


def decide(rule: GateRule, results: Iterable[Mapping[str, Any]]) -> GateDecision:
    """Apply `rule` to a version's results on every evaluation set. A condition with no
    image to measure it on (no set holds the old or the new classes) does not refuse the
    version; it is listed in `unmeasured`."""
    old, parent_old, new = _Pool(), _Pool(), _Pool()
    for result in results:
        old.add(result["old"]["images"], result["old"]["correct"])
        if result["old"]["parent_correct"] is not None:
            parent_old.add(result["old"]["images"], result["old"]["parent_correct"])
        new.add(result["new"]["images"], result["new"]["correct"])
    reasons: list[str] = []
    unmeasured: list[str] = []
    if rule.max_old_drop is not None:
        if old.accuracy is None or parent_old.accuracy is None:
            unmeasured.append("old classes: no evaluation image of a class the parent knew")
        else:
            drop = parent_old.accuracy - old.accuracy
            if drop > rule.max_old_drop:
                reasons.append(
                    f"accuracy on the old classes dropped {drop:.1f} points, from "
                    f"{parent_old.accuracy:.1f}% to {old.accuracy:.1f}% (at most "
                    f"{rule.max_old_drop:g} allowed)"
                )
    if rule.min_new_accuracy is not None:
        if new.accuracy is None:
            unmeasured.append("new classes: no evaluation image of the new classes")
        elif new.accuracy < rule.min_new_accuracy:
            reasons.append(
                f"accuracy on the new classes is {new.accuracy:.1f}% (at least "
                f"{rule.min_new_accuracy:g}% needed)"
            )
    return GateDecision(
        passed=not reasons,
        reasons=tuple(reasons),
        unmeasured=tuple(unmeasured),
        rule=rule,
        old_accuracy=old.accuracy,
        parent_old_accuracy=parent_old.accuracy,
        new_accuracy=new.accuracy,
    )


class _Pool:
    def __init__(self) -> None:
        self.images = 0
        self.correct = 0

    def add(self, images: int, correct: int) -> None:
        self.images += images
        self.correct += correct

    @property
    def accuracy(self) -> float | None:
        return 100.0 * self.correct / self.images if self.images else None
