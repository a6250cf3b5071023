"""How CRM values read: one truth for yes/no fields (consent flags, opt-in checkboxes) everywhere."""
from __future__ import annotations

# "checked": amoCRM/Bitrix24 checkbox fields; "да"/"д": Russian exports
TRUTHY = frozenset({"1", "true", "t", "yes", "y", "да", "д", "on", "checked"})


def truthy(value: object) -> bool:
    """A CRM yes/no value: booleans as they are, numbers non-zero, text in ``TRUTHY`` (case-insensitive)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value == value and value != 0  # NaN is not a yes
    return str(value).strip().lower() in TRUTHY
