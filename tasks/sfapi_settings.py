"""How to reach the Superfacility API and how long to wait for it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator
from sfapi_client.compute import Machine


class SfapiSettings(BaseModel):
    """How to reach SFAPI and how long to wait for it; the key is a secret or a 0600 key file."""

    api_base_url: str = "https://api.nersc.gov/api/v1.2"
    token_url: str = "https://oidc.nersc.gov/c2id/token"
    client_id: str = Field("", description="SFAPI client id; may come from the key file instead")
    key_path: Path | None = Field(
        None,
        description="0600 file: a PEM, a JWK JSON, sfapi's 'client_id line + PEM' or {client_id, secret} JSON",
    )
    secret: SecretStr | None = Field(None, description="the private key itself: a PEM or a JWK as JSON")
    machine: str = "perlmutter"
    poll_interval: float = Field(5.0, gt=0, description="seconds between job-state queries")
    submit_timeout: float = Field(
        120.0, gt=0, description="seconds for sbatch (the SFAPI task) to return a job id"
    )
    start_timeout: float = Field(
        1800.0,
        gt=0,
        description="seconds the session waits for its job to start (the realtime queue: usually seconds, "
        "rarely up to ~25 min); then the job is cancelled and the session fails",
    )
    pending_log_interval: float = Field(
        60.0, gt=0, description="seconds between reports of the pending time and Slurm's reason"
    )
    api_timeout: float = Field(60.0, gt=0, description="seconds one API operation may take, retries included")
    request_timeout: float = Field(10.0, gt=0, description="seconds one HTTP request may take")
    api_retries: int = Field(6, ge=1, description="attempts per API operation")
    retry_backoff: float = Field(1.0, gt=0, description="first back-off in seconds; doubles, at most 10 s")

    @field_validator("machine")
    @classmethod
    def _machine(cls, v: str) -> str:
        try:
            return Machine(v).value
        except ValueError:
            raise ValueError(f"unknown SFAPI machine {v!r}; e.g. {Machine.perlmutter.value}") from None

    @field_validator("key_path")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()
