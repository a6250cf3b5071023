"""Process-level settings (environment variables ``SMSFLOW_*``).

Per-integration options and credentials live in Prefect Blocks (``blocks/``);
this module holds only what a process needs before it can talk to anything.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The built-in sandbox gateway's price and sender (blocks.gateway.SandboxGateway's defaults; here so that a
# preview can price with them without importing Prefect for the Block)
SANDBOX_PRICE_PER_SEGMENT = 2.5
DEFAULT_CURRENCY = "RUB"
DEFAULT_SENDER_ID = "SMSFLOW"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMSFLOW_", extra="ignore")

    data_dir: Path = Field(default=PROJECT_ROOT / "data", description="Embedded store, reports and demo files.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL of the store; default: SQLite under data_dir.")
    default_region: str = Field(default="RU", description="Region for phone numbers written without a country code.")
    batch_size: int = Field(default=50_000, ge=100, description="Rows per batch task (task runs never grow per contact).")
    workers: int = Field(default=2, ge=1, description="Processes for CPU-heavy batch steps (phone parsing, rendering).")
    journeys_dir: Path = Field(default=PROJECT_ROOT / "journeys", description="Journey definitions (*.yaml).")
    receipt_ttl_seconds: int = Field(default=72 * 3600, description="Submitted messages without a final receipt expire after this.")
    mode: Literal["embedded", "distributed"] = Field(
        default="embedded",
        description="embedded: every step in the campaign's own process (the default). distributed: render in "
                    "shards, each a flow run of the render-shard deployment that any worker of the pool picks "
                    "up, and send through send deployment runs (needs PREFECT_API_URL and workers).")
    dask_address: str | None = Field(
        default=None, description="Dask scheduler (tcp://host:8786) that renders a shard's contacts in distributed "
                                  "mode; unset: the shard renders in its flow-run process.")
    link_base_url: str | None = Field(
        default=None, description="Base URL of tracked short links, on the operator's own domain "
                                  "(https://s.example.ru): link() in templates needs it; `smsflow serve` answers it.")
    link_ttl_days: int = Field(default=90, ge=1, description="A short link redirects for this long, then shows "
                                                             "an expired-link page.")
    click_ip_key: str | None = Field(default=None, description="Key of the IP hash stored with clicks (default: "
                                                              "a random key kept in the data dir).")
    click_commit: Literal["sync", "async"] = Field(
        default="sync", description="PostgreSQL store: 'sync' answers a redirect once its click's WAL is flushed; "
        "'async' commits click batches with synchronous_commit off (a click still survives any crash of the "
        "service, as on SQLite's WAL store; a power loss of the database host may lose its last ~0.6 s of clicks): "
        "for a database disk with slow flushes.")
    attribution_delivery_days: float = Field(default=7.0, gt=0, description="An order within this many days after "
                                             "a message's delivery is credited to it (the last touch wins).")
    attribution_click_days: float = Field(default=7.0, gt=0, description="An order within this many days after a "
                                          "person's click on a message's link is credited to it.")
    global_holdout: float = Field(default=0.0, ge=0, le=0.5, description="Share of all contacts kept from all "
                                  "marketing (measures marketing's overall effect); 0 = none.")
    global_holdout_salt: str = Field(default="smsflow-global-holdout", description="Assignment salt of the global "
                                     "holdout (its own, so it is independent of every campaign's arms).")
    shard_size: int = Field(default=200_000, ge=100, description="Contacts per render shard in distributed mode "
                                                                 "(each costs a flow-run process start, ~6-9 s).")

    @property
    def store_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'smsflow.sqlite').resolve()}"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests change the environment)."""
    get_settings.cache_clear()
