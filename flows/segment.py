"""Flow: declarative segment definitions -> membership in the store."""
from __future__ import annotations

from prefect import flow, get_run_logger

from tasks.segment import resolve_segment, segment_task


@flow(name="segment")
def segment(source: str = "demo-crm", segment: str = "all", segments_file: str | None = None,
            database_url: str | None = None) -> dict:
    """Recompute one segment's membership among the valid contacts of a source."""
    definition = resolve_segment(segment, segments_file)
    size = segment_task(source, definition, database_url)
    get_run_logger().info("segment %s of %s: %d members", definition.name, source, size)
    return {"segment": definition.name, "source": source, "members": size}


if __name__ == "__main__":
    segment()
