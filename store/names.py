"""The rule for class names, the one place that says what a valid name is.

The store refuses names that break it (`Jobs.submit`, `Registry.publish`); the server
first normalises an uploaded name (`normalize_class_name`) and then checks it against the
(possibly lower) limit of its settings. `MAX_NAME_LENGTH` is also the width of the
database's name and key columns.
"""

from __future__ import annotations

import unicodedata

MAX_NAME_LENGTH = 200
# Unicode categories refused in a name: every "C" (control, format, ...) and the line and
# paragraph separators (U+2028, U+2029), which break a line as a control character does.
_REFUSED_CATEGORIES = ("Zl", "Zp")


def normalize_class_name(raw: str) -> str:
    """A class name as stored: Unicode NFC, without surrounding spaces."""
    return unicodedata.normalize("NFC", raw).strip()


def class_name_problem(name: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why `name` is not a valid class name (a sentence that says what to fix), or None:
    a name is not blank, at most `max_length` characters and holds no control characters
    (nor line or paragraph separators)."""
    if not name.strip():
        return "the class name is empty; give every class a name"
    if len(name) > max_length:
        return (
            f"the class name {name[:40]!r}... is {len(name)} characters; at most "
            f"{max_length} are allowed"
        )
    if any(_refused(unicodedata.category(c)) for c in name):
        return f"the class name {name!r} holds control characters; remove them"
    return None


def _refused(category: str) -> bool:
    return category[0] == "C" or category in _REFUSED_CATEGORIES
