"""Fixtures for tasks/: SFAPI client settings for the loopback fake SFAPI (jobs on the loopback Slurm, or in
process). The sshd, the Slurm cluster, the fake itself and the SFAPI keys are shared fixtures in
tests/conftest.py."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from stemstream_testing.fake_sfapi import FakeSfapi
from tasks.settings import SfapiSettings

from .helpers import CLIENT_ID


# ---- SFAPI (sfapi_pem, fake, the Slurm fixtures and sshd are in tests/conftest.py) ----------------
@pytest.fixture
def sfapi_settings(fake: FakeSfapi, sfapi_pem: str) -> SfapiSettings:
    return _sfapi_settings(fake, sfapi_pem)


def _sfapi_settings(fake: FakeSfapi, pem: str, **update: object) -> SfapiSettings:
    values: dict[str, object] = {
        "api_base_url": fake.base_url,
        "token_url": fake.token_url,
        "client_id": CLIENT_ID,
        "secret": SecretStr(pem),
        "poll_interval": 0.05,
        "submit_timeout": 5,
        "start_timeout": 5,
        "api_timeout": 5,
        "request_timeout": 2,
        "api_retries": 5,
        "retry_backoff": 0.05,
    }
    return SfapiSettings(**(values | update))


@pytest.fixture
def slurm_sfapi_settings(slurm_fake: FakeSfapi, sfapi_pem: str) -> SfapiSettings:
    """Client settings for the fake in front of Slurm (polls a real squeue: 0.1 s apart)."""
    return _sfapi_settings(slurm_fake, sfapi_pem, poll_interval=0.1, start_timeout=20)
