"""Flow: new contacts -> Great Expectations checks, E.164 phones, quarantine, duplicates merged."""
from __future__ import annotations

from prefect import flow, get_run_logger

from smsflow.settings import get_settings
from tasks.validate import validate_task


@flow(name="validate-and-dedup")
def validate_and_dedup(source: str = "demo-crm", default_region: str | None = None, database_url: str | None = None) -> dict:
    """Report what the extract validated since the last run (Great Expectations results as an artifact),
    validate contacts still 'new', merge duplicates; a broken extract stops here with a clear message."""
    s = get_settings()
    stats = validate_task(source, default_region or s.default_region, s.workers, database_url)
    get_run_logger().info("validate %s: %d checked, %d valid, %d quarantined, %d duplicates",
                          source, stats.checked, stats.valid, stats.quarantined, stats.duplicates)
    return {"source": source, "checked": stats.checked, "valid": stats.valid, "quarantined": stats.quarantined,
            "duplicates": stats.duplicates, "by_status": stats.by_status}


if __name__ == "__main__":
    validate_and_dedup()
