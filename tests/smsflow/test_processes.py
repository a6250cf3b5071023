"""smsflow/processes.py: the temporary Prefect API a command starts when no server is configured."""
from __future__ import annotations

import httpx


def test_the_temporary_api_starts_under_a_prefect_home_whose_parents_do_not_exist(tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from smsflow.processes import embedded_prefect_api

    home = tmp_path / "not" / "yet" / "home"
    with temporary_settings(updates={PREFECT_HOME: str(home)}, set_defaults={PREFECT_API_URL: None},
                            restore_defaults={PREFECT_API_URL}):
        with embedded_prefect_api() as url:
            assert url and httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert home.is_dir()
