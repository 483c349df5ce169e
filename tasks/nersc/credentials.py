"""The SFAPI client id and private key from settings: a secret or a 0600 key file, in any of sfapi's forms;
errors name the file, never the key."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from tasks.nersc.errors import SfapiCredentialsError
from tasks.settings import SfapiSettings


def credentials(settings: SfapiSettings) -> tuple[str, str | dict[str, Any]]:
    """(client_id, private key as PEM text or JWK dict) from the settings' secret or key file."""
    if settings.secret is not None:
        raw, source = settings.secret.get_secret_value(), "sfapi.secret"
    elif settings.key_path is not None:
        raw, source = _read_key_file(settings.key_path), str(settings.key_path)
    else:
        raise SfapiCredentialsError(
            "no SFAPI credentials: set sfapi.secret (PEM or JWK JSON) or sfapi.key_path"
        )
    client_id, key = _parse_key(raw, source)
    client_id = settings.client_id or client_id
    if not client_id:
        raise SfapiCredentialsError(f"no SFAPI client id: set sfapi.client_id (none found in {source})")
    return client_id, key


def _read_key_file(path: Path) -> str:
    """The key file's text; it must be private (mode 0600) like sfapi_client demands."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SfapiCredentialsError(f"SFAPI key file {path} is readable by others: chmod 600 {path}")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SfapiCredentialsError(
            f"cannot read SFAPI key file {path}: {os.strerror(exc.errno or 0)}"
        ) from None


def _parse_key(raw: str, source: str) -> tuple[str, str | dict[str, Any]]:
    """Split a key text into (client id if it holds one, PEM or JWK dict); never echoes the text."""
    text = raw.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise SfapiCredentialsError(f"the SFAPI key in {source} is not valid JSON") from None
        if isinstance(data.get("secret"), dict | str):  # sfapi's {"client_id": ..., "secret": <JWK>}
            client_id, data = str(data.get("client_id") or ""), data["secret"]
            if isinstance(data, str):
                return client_id, _parse_key(data, source)[1]
        else:
            client_id = ""
        if not isinstance(data, dict) or data.get("kty") != "RSA" or "d" not in data:
            raise SfapiCredentialsError(f"the SFAPI key in {source} is not a private RSA JWK")
        return client_id, data
    client_id = ""
    if not text.startswith("-----BEGIN"):  # sfapi's key file: the client id on the first line, then the PEM
        client_id, _, text = text.partition("\n")
        client_id, text = client_id.strip(), text.strip()
    _check_pem(text, source)
    return client_id, text + "\n"


def _check_pem(pem: str, source: str) -> None:
    """Fail early and clearly on a key the token request could not sign with."""
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise SfapiCredentialsError(
            f"the SFAPI key in {source} is not an unencrypted PEM private key (or a JWK)"
        ) from None
