"""The Airflow side of the package store (warehouse_gdpr.transport.PackageStore): `airflow.sdk.ObjectStoragePath`.

The policy's `access.location` is a folder (a relative one is under `$AIRFLOW_HOME`) or an
ObjectStoragePath URL (`s3://aws_default@bucket/prefix`, `gs://...`, `file:///srv/gdpr/access`): the
connection named in the URL gives the credentials, as Airflow's object storage does everywhere. Messages
name the location and the exception's type, never a file's content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from warehouse_gdpr.transport import StoreError


def root_url(location: str, home: Path) -> str:
    """The ObjectStoragePath URL of a policy's `access.location` or `evidence.location` (a folder becomes a
    `file://` URL)."""
    if "://" in location:
        return location.rstrip("/")
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = home / path
    return f"file://{path.resolve()}"


class ObjectStoragePackages:
    """`transport.PackageStore` under one ObjectStoragePath folder."""

    def __init__(self, location: str, home: Path) -> None:
        from airflow.sdk import ObjectStoragePath

        self.url = root_url(location, home)
        try:
            self.root = ObjectStoragePath(self.url)
        except Exception as exc:  # noqa: BLE001 - an unknown scheme, a connection that does not exist
            raise StoreError(
                f"access.location {self.url}: not usable as object storage ({type(exc).__name__})") from None

    def _path(self, name: str) -> Any:
        if "/" in name or name in ("", ".", ".."):
            raise StoreError(f"not a package file name: {name!r}")
        return self.root / name

    def location(self, name: str) -> str:
        return f"{self.url}/{name}"

    def write(self, name: str, data: bytes) -> str:
        path = self._path(name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except Exception as exc:  # noqa: BLE001 - permissions, credentials, a full disk
            raise StoreError(f"cannot write {self.location(name)} ({type(exc).__name__})") from None
        return self.location(name)

    def read(self, name: str, size: int | None = None) -> bytes:
        path = self._path(name)
        try:
            with path.open("rb") as handle:
                data: bytes = handle.read() if size is None else handle.read(size)
                return data
        except FileNotFoundError:
            raise StoreError(f"no package {self.location(name)}") from None
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot read {self.location(name)} ({type(exc).__name__})") from None

    def names(self) -> list[str]:
        try:
            if not self.root.exists():
                return []
            return sorted(p.name for p in self.root.iterdir() if p.is_file())
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot list {self.url} ({type(exc).__name__})") from None

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            if path.exists():
                path.unlink()
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot delete {self.location(name)} ({type(exc).__name__})") from None
