"""Flow: metrics per campaign and segment -> Prefect artifacts + an HTML file with a chart."""
from __future__ import annotations

from prefect import flow, get_run_logger

from smsflow.settings import get_settings
from tasks.report_page import report_task


@flow(name="report")
def report(campaign: str | None = None, out_dir: str | None = None, database_url: str | None = None) -> dict:
    """Nightly metrics (all campaigns) or one campaign's report."""
    r = report_task(campaign, out_dir or str(get_settings().reports_dir), database_url)
    get_run_logger().info("report written: %s", r.html_path)
    return {"html": str(r.html_path), "rows": r.rows, "failures": r.failures}


if __name__ == "__main__":
    report()
