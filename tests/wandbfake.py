"""A fake of W&B's HTTP API, for tests only: just what the real ``wandb`` 0.31 client sends for
``wandb.Api()``, ``Api().artifact("entity/project/name:alias")`` and ``Artifact.download()``.

It is a threaded HTTP server on 127.0.0.1; point the client at it with ``WANDB_BASE_URL`` and any
``WANDB_API_KEY`` (the fake checks that the client sends the key it was given). It answers:

- ``POST /graphql`` (sent by wandb-core, the client's Go sidecar, on behalf of the Python API), by
  operation name:
  ``Viewer`` (the login check ``wandb.Api()`` makes), ``GetDefaultEntity`` (asked when no entity is
  configured), ``ServerFeaturesQuery`` (what the server
  supports; the fake says: nothing optional), ``ArtifactMembershipByName`` (``Api().artifact``),
  ``FetchArtifactManifest`` (where the manifest is), ``GetArtifactMembershipFileUrls`` (where each
  file is). Any other operation is answered with a GraphQL error naming it, and recorded in
  ``unknown``, so a test sees at once when the client starts asking for something else.
- ``GET /manifests/<artifact id>``: the manifest JSON (``wandb_manifest.json``), and
  ``GET /files/<artifact id>/<path>``: a file's bytes, as W&B's object storage serves them from
  the signed URLs (``directUrl``) the queries above hand out.
- ``POST /sdk/otel/v1/metrics``: the client's telemetry, accepted and ignored.

A version is stored the way W&B holds it after a live ``run.log_artifact``: the manifest is the
one the real client builds (``wandb.Artifact.add_dir(..., policy="immutable")``, as
``orchestrator.tracking.wandb`` logs outputs), the W&B digest that manifest's, versions of a
collection are numbered v0, v1, ... in logging order, ``latest`` names the newest, and an alias
moves to the version it was last given to. Not faked: uploads, runs, lineage queries, pagination
beyond one page, and W&B's behaviour under load or failure (see ``fail_with``).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote


@dataclass
class FakeVersion:
    """One artifact version as W&B stores it."""

    id: str
    collection: str
    type: str
    index: int
    metadata: dict[str, Any]
    manifest: dict[str, Any]
    digest: str
    files: dict[str, bytes]
    created_at: str
    aliases: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


class FakeWandb:
    """The fake server's state (one entity and project) and its HTTP server."""

    def __init__(self, entity: str, project: str, api_key: str) -> None:
        self.entity, self.project, self.api_key = entity, project, api_key
        self.versions: list[FakeVersion] = []
        self.requests: list[str] = []  # "graphql <operation>" or "GET <path>", in arrival order
        self.unknown: list[str] = []  # operations or paths the fake does not answer
        self.fail_with: int | None = None  # answer every request with this HTTP status (a broken server)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------- content
    def log_artifact(self, name: str, type: str, folder: Path, metadata: dict[str, Any], aliases: list[str]) -> FakeVersion:
        """Store the files under ``folder`` as the next version of collection ``name``, as a live
        ``log_artifact`` would have left them on W&B."""
        import wandb

        art = wandb.Artifact(name=name, type=type, metadata=metadata)
        art.add_dir(str(folder), policy="immutable")
        files = {path: (folder / path).read_bytes() for path in art.manifest.entries}
        index = sum(1 for v in self.versions if v.collection == name)
        vid = base64.b64encode(f"Artifact:{len(self.versions) + 1}".encode()).decode()
        manifest = art.manifest.to_manifest_json()
        for entry in manifest["contents"].values():
            entry["birthArtifactID"] = vid  # W&B records where each file was first uploaded
        version = FakeVersion(
            id=vid,
            collection=name,
            type=type,
            index=index,
            metadata=json.loads(json.dumps(metadata)),
            manifest=manifest,
            digest=art.manifest.digest(),
            files=files,
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        )
        with self._lock:
            for alias in aliases:
                for other in self.versions:
                    if other.collection == name and alias in other.aliases:
                        other.aliases.remove(alias)
            version.aliases = list(dict.fromkeys(aliases))
            self.versions.append(version)
        return version

    def find(self, collection: str, alias: str) -> FakeVersion | None:
        """The version ``alias`` (``vN``, ``latest`` or a custom alias) of ``collection`` names."""
        mine = [v for v in self.versions if v.collection == collection]
        if not mine:
            return None
        if alias == "latest":
            return mine[-1]
        if alias.startswith("v") and alias[1:].isdigit():
            return next((v for v in mine if v.index == int(alias[1:])), None)
        return next((v for v in mine if alias in v.aliases), None)

    def tamper(self, collection: str, alias: str, path: str, data: bytes, *, manifest_too: bool = True) -> None:
        """Serve ``data`` for one file from now on. ``manifest_too``: W&B's own manifest agrees with
        the new bytes (as if the version held other content), so only the orchestrator's check can
        tell; otherwise only the bytes in storage changed."""
        version = self.find(collection, alias)
        if version is None:
            raise KeyError(f"{collection}:{alias}")
        version.files[path] = data
        if manifest_too:
            entry = version.manifest["contents"][path]
            entry["digest"] = _b64md5(data)
            entry["size"] = len(data)

    # -------------------------------------------------------------------------------- server
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake W&B server is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Serve on 127.0.0.1 (a free port) from a daemon thread."""
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-wandb", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def note(self, what: str) -> None:
        with self._lock:
            self.requests.append(what)

    # ------------------------------------------------------------------------------- GraphQL
    def graphql(self, op: str, variables: dict[str, Any]) -> dict[str, Any]:
        """The ``data`` of the answer to operation ``op``; KeyError for an operation not faked."""
        handler = getattr(self, f"_gql_{op}", None)
        if handler is None:
            raise KeyError(op)
        return handler(variables)

    def _gql_Viewer(self, variables: dict[str, Any]) -> dict[str, Any]:  # noqa: N802 - named after the operation
        return {
            "viewer": {
                "id": "VXNlcjox",
                "entity": self.entity,
                "username": "fake-user",
                "email": "fake@example.invalid",
                "flags": "{}",
                "teams": {"edges": [{"node": {"name": self.entity}}]},
            }
        }

    def _gql_GetDefaultEntity(self, variables: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        return {"viewer": {"id": "VXNlcjox", "entity": self.entity}}

    def _gql_ServerFeaturesQuery(self, variables: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        return {"serverInfo": {"features": []}}

    def _project(self, variables: dict[str, Any]) -> bool:
        return variables.get("entity") == self.entity and variables.get("project") == self.project

    def _project_info(self) -> dict[str, Any]:
        return {"id": "UHJvamVjdDox", "internalId": "1", "name": self.project, "entity": {"name": self.entity}}

    def _gql_ArtifactMembershipByName(self, variables: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        if not self._project(variables):
            return {"project": None}
        collection, _, alias = str(variables["name"]).partition(":")
        version = self.find(collection, alias or "latest")
        if version is None:
            return {"project": {"artifactCollectionMembership": None}}
        return {"project": {"artifactCollectionMembership": self._membership(version)}}

    def _membership(self, v: FakeVersion) -> dict[str, Any]:
        collection = {"__typename": "ArtifactSequence", "name": v.collection, "project": self._project_info()}
        newest = self.find(v.collection, "latest")
        aliases = [*v.aliases, *(["latest"] if newest is v else [])]
        return {
            "__typename": "ArtifactCollectionMembership",
            "id": f"{v.id}-membership",
            "versionIndex": v.index,
            "createdAt": v.created_at,
            "aliases": [{"__typename": "ArtifactAlias", "id": f"{v.id}-{a}", "alias": a} for a in aliases],
            "artifactCollection": collection,
            "artifact": {
                "__typename": "Artifact",
                "id": v.id,
                "artifactSequence": collection,
                "versionIndex": v.index,
                "artifactType": {"name": v.type},
                "description": None,
                "metadata": json.dumps(v.metadata),
                "ttlDurationSeconds": -2,
                "ttlIsInherited": True,
                "tags": [],
                "historyStep": None,
                "state": "COMMITTED",
                "size": v.size,
                "digest": v.digest,
                "commitHash": "0" * 12,
                "fileCount": len(v.files),
                "createdAt": v.created_at,
                "updatedAt": v.created_at,
            },
        }

    def _by_id(self, vid: str) -> FakeVersion | None:
        return next((v for v in self.versions if v.id == vid), None)

    def _gql_FetchArtifactManifest(self, variables: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        version = self._by_id(str(variables.get("id")))
        if version is None:
            return {"artifact": None}
        return {"artifact": {"currentManifest": {"file": {"directUrl": f"{self.url}/manifests/{quote(version.id, safe='')}"}}}}

    def _gql_GetArtifactMembershipFileUrls(self, variables: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        if not self._project(variables):
            return {"project": None}
        version = self.find(str(variables["collection"]), str(variables["alias"]))
        if version is None:
            return {"project": {"artifactCollection": None}}
        edges = [
            {"node": {"__typename": "File", "name": path, "directUrl": self._file_url(version, path)}}
            for path in sorted(version.manifest["contents"])
        ]
        page = {"__typename": "PageInfo", "endCursor": None, "hasNextPage": False}
        membership = {"files": {"pageInfo": page, "edges": edges}}
        return {"project": {"artifactCollection": {"__typename": "ArtifactSequence", "artifactMembership": membership}}}

    def _file_url(self, version: FakeVersion, path: str) -> str:
        return f"{self.url}/files/{quote(version.id, safe='')}/{quote(path)}"

    # ------------------------------------------------------------------------------ downloads
    def download(self, path: str) -> bytes | None:
        """The bytes at a ``directUrl`` path, or None."""
        kind, _, rest = path.lstrip("/").partition("/")
        vid, _, file_path = rest.partition("/")
        version = self._by_id(unquote(vid))
        if version is None:
            return None
        if kind == "manifests" and not file_path:
            return json.dumps(version.manifest).encode()
        if kind == "files":
            return version.files.get(unquote(file_path))
        return None


def _operation_name(query: str) -> str:
    """The name in ``query X(...) {`` (wandb-core does not always send ``operationName``)."""
    m = re.search(r"\b(?:query|mutation)\s+([A-Za-z_][A-Za-z0-9_]*)", query)
    return m[1] if m else ""


def _b64md5(data: bytes) -> str:
    import hashlib

    return base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324 - W&B's content digest


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeWandb

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        expected = base64.b64encode(f"api:{self.server_state.api_key}".encode()).decode()
        return self.headers.get("Authorization") == f"Basic {expected}"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        fake, body = self.server_state, self._body()
        if self.path.startswith("/sdk/otel/"):
            self._reply(200, b"", "application/x-protobuf")
            return
        if fake.fail_with is not None:
            self._reply(fake.fail_with, b'{"errors": [{"message": "fake server failure"}]}')
            return
        if self.path != "/graphql":
            fake.unknown.append(f"POST {self.path}")
            self._reply(404, b"{}")
            return
        request = json.loads(body or b"{}")
        op = str(request.get("operationName") or "") or _operation_name(str(request.get("query") or ""))
        fake.note(f"graphql {op}")
        if not self._authorized():
            self._reply(401, b'{"errors": [{"message": "user is not logged in"}]}')
            return
        try:
            data = fake.graphql(op, request.get("variables") or {})
        except KeyError:
            fake.unknown.append(f"graphql {op}: {str(request.get('query'))[:300]}")
            self._reply(200, json.dumps({"data": None, "errors": [{"message": f"fake W&B does not answer {op!r}"}]}).encode())
            return
        self._reply(200, json.dumps({"data": data}).encode())

    def do_GET(self) -> None:  # noqa: N802
        fake = self.server_state
        fake.note(f"GET {self.path}")
        if fake.fail_with is not None:
            self._reply(fake.fail_with, b"fake server failure", "text/plain")
            return
        data = fake.download(self.path)
        if data is None:
            fake.unknown.append(f"GET {self.path}")
            self._reply(404, b"not found", "text/plain")
            return
        self._reply(200, data, "application/octet-stream")


@contextmanager
def serving(entity: str, project: str, api_key: str) -> Iterator[FakeWandb]:
    """A running fake server; stopped afterwards."""
    fake = FakeWandb(entity, project, api_key)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
