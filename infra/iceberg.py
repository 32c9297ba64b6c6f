"""The Iceberg catalog: SQLite SqlCatalog with a file warehouse locally, REST in production.

Only catalog access lives here for now; the audit tables and their writer build on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_incrementing

from ragstream.infra.settings import Settings
from ragstream.schemas.errors import ConfigError, DependencyUnavailable

__all__ = ["catalog_properties", "ensure_namespace", "open_catalog"]


def catalog_properties(settings: Settings) -> dict[str, str]:
    ice = settings.iceberg
    props: dict[str, str] = {"uri": settings.iceberg_catalog_uri, "warehouse": settings.iceberg_warehouse}
    if ice.catalog_type == "sql":
        props["type"] = "sql"
    else:
        if not ice.catalog_uri:
            raise ConfigError(
                "iceberg.catalog_type=rest needs iceberg.catalog_uri (RAGSTREAM_ICEBERG__CATALOG_URI)"
            )
        props["type"] = "rest"
    if ice.s3_endpoint:
        props["s3.endpoint"] = ice.s3_endpoint
        props["s3.region"] = ice.s3_region
        props["s3.path-style-access"] = "true"
    if ice.s3_access_key_id:
        props["s3.access-key-id"] = ice.s3_access_key_id
    if ice.s3_secret_access_key is not None:
        props["s3.secret-access-key"] = ice.s3_secret_access_key.get_secret_value()
    return props


def open_catalog(settings: Settings) -> Any:
    """Load the catalog (creating the local SQLite file and warehouse dir if embedded).

    Raises:
        DependencyUnavailable: the catalog cannot be reached or opened.
    """
    from pyiceberg.catalog import load_catalog

    props = catalog_properties(settings)
    if props["type"] == "sql":
        db = Path(settings.iceberg_catalog_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        if props["warehouse"].startswith("file://"):
            Path(props["warehouse"].removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    # Two processes opening a new SQLite catalog at once (two audit sinks starting together)
    # both try to create its bookkeeping tables, and the loser gets "table ... already
    # exists" (or "database is locked"): harmless, the next try finds the tables.
    retrying = Retrying(
        retry=retry_if_exception(_is_sqlite_init_race),
        stop=stop_after_attempt(5 if props["type"] == "sql" else 1),
        wait=wait_incrementing(start=0.1, increment=0.1),
        reraise=True,
    )
    try:
        return retrying(load_catalog, settings.iceberg.catalog_name, **props)
    except Exception as exc:  # sqlalchemy, http and OS errors each have their own types
        raise DependencyUnavailable(f"cannot open Iceberg catalog {props['uri']}: {exc}") from exc


def _is_sqlite_init_race(exc: BaseException) -> bool:
    text = str(exc)
    return "already exists" in text or "database is locked" in text


def ensure_namespace(settings: Settings) -> None:
    """Create the audit namespace if missing.

    Raises:
        DependencyUnavailable: the catalog cannot be reached.
    """
    catalog = open_catalog(settings)
    try:
        create_namespace(catalog, settings.iceberg.namespace)
    except Exception as exc:
        raise DependencyUnavailable(f"cannot create namespace {settings.iceberg.namespace}: {exc}") from exc


def create_namespace(catalog: Any, namespace: str, attempts: int = 5) -> None:
    """Create the namespace if missing. Two processes starting together (two audit sinks,
    or a sink and `ragstream up`) may both find it missing and race to create it; the
    loser's error is harmless, and the next look finds it.

    Raises:
        Exception: whatever the catalog raised on the last attempt.
    """
    # Any error: an IntegrityError from SQLite, a 409 from a REST catalog, ...
    Retrying(
        stop=stop_after_attempt(attempts), wait=wait_incrementing(start=0.1, increment=0.1), reraise=True
    )(catalog.create_namespace_if_not_exists, namespace)
