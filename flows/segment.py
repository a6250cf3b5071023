"""Flow: declarative segment definitions -> membership in the store."""
from __future__ import annotations

from prefect import flow, get_run_logger

from tasks.segment import ALL, load_segments, segment_task


def resolve_segment(segment: str, segments_file: str | None):
    if segment == "all" and not segments_file:
        return ALL
    if not segments_file:
        raise ValueError(f"segment '{segment}' needs a segments file (YAML) that defines it")
    defs = load_segments(segments_file)
    if segment not in defs:
        raise ValueError(f"segment '{segment}' is not defined in {segments_file}; defined: {', '.join(sorted(defs))}")
    return defs[segment]


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
