"""W&B tracking: every job is a W&B run, every committed output a versioned W&B artifact.

The local store stays the source of truth: the runner resolves inputs through it (the "mirror")
and commits outputs to it first; this backend mirrors runs, metrics and artifacts to W&B.

- **Run.** ``group`` = study, ``job_type`` = stage id, ``name`` = job label, ``config`` = params,
  job key, seed, matrix point and spec hash; ``tags`` = ``tracking.tags`` + the study name. The run
  id is derived from the study and the job key, so a requeued job resumes the same run
  (``resume="allow"``). The run's files live under ``studies/<study>/jobs/<key>/wandb/`` so that
  ``python -m orchestrator sync`` finds them; when the run ends, the job drops its trigger in
  ``studies/<study>/wandb-ready/`` for ``sync --watch`` (``orchestrator.tracking.wandb_files``).
- **Outputs.** ``log_artifact`` with the version's type, metadata (+ lineage under ``orchestrator``)
  and aliases (``study-<name>``, ``job-<key16>``). Files are added from the store's read-only
  materialized copy with ``policy="immutable"`` (no second copy in W&B's staging area), or as
  ``file://`` references when ``tracking.reference_artifacts`` is set (nothing uploaded). The
  version's images and HTML pages are also logged to the run as ``wandb.Image`` / ``wandb.Html``
  (``orchestrator.tracking.media``), so W&B's UI shows them.
- **Inputs.** Online: ``use_artifact("<name>:job-<upstream key16>")`` so W&B's lineage graph is the
  study's DAG, and the W&B version's digest is checked against the local one. Offline (wandb 0.31
  cannot ``use_artifact`` offline): the inputs go to the run config (``inputs``) and to
  ``wandb-run.json`` next to the run; ``sync`` declares them through the public API after upload.
- **Failures never fail the job.** A W&B error is printed to the job log and the job completes on
  the local store. An online run that fails switches to an offline run with the same id (synced
  later into the same W&B run); ``init`` and ``finish`` are bounded by timeouts.
- **Credentials** come from the environment or a ``.env`` file (cwd, then the store root) and are
  never written anywhere: not to the config, the job log, the records or the artifacts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from orchestrator.artifacts import ArtifactVersion
from orchestrator.fsutil import atomic_write_json
from orchestrator.paths import StudyPaths
from orchestrator.records import JobRecord, now
from orchestrator.tracking.base import TrackingRun
from orchestrator.tracking.local import LocalRun
from orchestrator.tracking.media import select_media, wandb_media
from orchestrator.tracking.wandb_files import (
    INSTALL_HINT,
    KEY_VAR,
    MARKER,
    SERVICE_END_S,
    WANDB_NAME,
    end_service,
    import_wandb,
    load_api_key,
    marker_path,
    read_dotenv,
    read_marker,
    redact,
    requested_mode,
    run_id,
    wandb_artifact_name,
    write_ready,
)

__all__ = [  # what sync, sweeps and tests import from here (the shared helpers live in wandb_files)
    "INSTALL_HINT", "KEY_VAR", "MARKER", "WANDB_NAME", "WandbRun", "import_wandb", "load_api_key",
    "marker_path", "read_dotenv", "read_marker", "redact", "requested_mode", "run_id", "run_tags",
    "wandb_artifact_name",
]

INIT_TIMEOUT_S = 90.0  # wandb.init gives up after this (env ORCHESTRATOR_WANDB_INIT_TIMEOUT overrides)
FINISH_TIMEOUT_S = 300.0  # run.finish stops waiting for uploads (env ORCHESTRATOR_WANDB_FINISH_TIMEOUT)
ALIAS_FORBIDDEN = set("/:")


def run_tags(study: str, tags: Sequence[str]) -> list[str]:
    """``tracking.tags``, then the study's name (a tag to filter runs by study across groups and projects)."""
    return list(dict.fromkeys([*tags, study]))


def _seconds(var: str, default: float) -> float:
    try:
        value = float(os.environ.get(var, default))
    except ValueError:
        return default
    return value if value > 0 else default


# ------------------------------------------------------------------------------------------ run
class WandbRun(TrackingRun):
    """One job's W&B run. Metrics also go to the job's ``metrics.jsonl`` (as with local tracking),
    so nothing depends on W&B being reachable."""

    mirrors_files = True

    def __init__(
        self, record: JobRecord, paths: StudyPaths, *, wandb: ModuleType | None = None, echo: Callable[[str], None] | None = None
    ) -> None:
        self.record = record
        self.paths = paths
        self.wandb = wandb or import_wandb()
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.local = LocalRun(paths.job(record.key).metrics)
        self.job_dir = paths.job(record.key).dir
        self.marker = marker_path(paths, record.key)
        self.run_id = run_id(record.study, record.key)
        self.mode = requested_mode(record.tracking.mode)
        self.run: Any = None
        self.online = False
        previous = read_marker(self.marker) or {}
        self.state: dict[str, Any] = {
            "run_id": self.run_id,
            "project": record.tracking.project,
            "entity": record.tracking.entity,
            "study": record.study,
            "job_key": record.key,
            "label": record.label,
            "requested_mode": self.mode,
            "mode": None,
            "runs": list(previous.get("runs", [])),  # every attempt's run directory, oldest first
            "synced": list(previous.get("synced", [])),  # written by sync
            "inputs": [],
            "outputs": [],
            "errors": [],
            "finished": False,
        }
        if self.mode == "disabled":
            self.echo("W&B: WANDB_MODE=disabled; metrics go to metrics.jsonl only")
        else:
            if self.mode == "online":
                load_api_key(Path.cwd(), record.root)
            self._start(self.mode)
        self._save()

    # --------------------------------------------------------------------------- lifecycle
    def _settings(self) -> Any:
        return self.wandb.Settings(
            init_timeout=_seconds("ORCHESTRATOR_WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S),
            finish_timeout=_seconds("ORCHESTRATOR_WANDB_FINISH_TIMEOUT", FINISH_TIMEOUT_S),
            finish_timeout_raises=True,
            console="wrap",  # python-level capture only: the job log keeps the process's own output
        )

    def _config(self) -> dict[str, Any]:
        r = self.record
        return {
            "study": r.study,
            "stage_id": r.stage_id,
            "stage": r.stage,
            "stage_version": r.stage_version,
            "job_key": r.key,
            "label": r.label,
            "seed": r.seed,
            "point": dict(r.point),
            "spec_hash": r.spec_hash,
            "params": dict(r.params),
            "inputs": [f"{e['artifact']}:{e['alias']}" for e in self.state["inputs"]],
        }

    def _start(self, mode: str) -> bool:
        """Open the run in ``mode``; an online run that cannot start falls back to offline."""
        t = self.record.tracking
        try:
            self.run = self.wandb.init(
                project=t.project,
                entity=t.entity,
                group=self.record.study,
                job_type=self.record.stage_id,
                name=self.record.label,
                id=self.run_id,
                resume="allow",
                dir=str(self.job_dir),
                mode=mode,
                config=self._config(),
                reinit="create_new",
                tags=run_tags(self.record.study, t.tags),
                settings=self._settings(),
            )
        except Exception as e:  # noqa: BLE001 - any W&B failure degrades to offline, never fails the job
            self._error(f"could not start the {mode} run", e)
            self.run = None
            if mode != "online":
                return False
            self._teardown()  # a failed online init leaves its run id "in use" in wandb's service
            return self._start("offline")
        self.online = mode == "online" and not getattr(self.run, "offline", False)
        self.state["mode"] = "online" if self.online else "offline"
        self._note_run_dir()
        if not self.online:
            self.echo(
                f"W&B: offline run {self.run_id} in {self._rel(self._run_dir())}; "
                f"upload it with: python -m orchestrator sync {self.record.study}"
            )
        return True

    def _go_offline(self, reason: str) -> bool:
        """After an online failure: end the broken run and continue in an offline run with the same
        id, which ``sync`` later uploads into the same W&B run."""
        if not self.online:
            return False
        self.echo(f"W&B: {reason}; continuing offline (nothing is lost: sync the study later)")
        broken, self.run, self.online = self.run, None, False
        # wandb allows one active run per id: end the broken one first (each step bounded by finish_timeout)
        if not self._finish_one(broken, ok=False, online=True):
            self._teardown()
        return self._start("offline")

    def _teardown(self) -> None:
        if not end_service(self.wandb):
            self.echo(f"W&B: its service process did not end within {SERVICE_END_S:.0f}s after the failure; killed it")

    def _run_dir(self) -> Path | None:
        files = getattr(self.run, "dir", None)
        return Path(files).parent if files else None

    def _note_run_dir(self) -> None:
        run_dir = self._run_dir()
        if run_dir is None:
            return
        entry = {"dir": self._rel(run_dir), "mode": "online" if self.online else "offline", "uploaded": False}
        if all(r["dir"] != entry["dir"] for r in self.state["runs"]):
            self.state["runs"].append(entry)

    def _rel(self, path: Path | None) -> str:
        if path is None:
            return "?"
        try:
            return str(path.resolve().relative_to(self.job_dir.resolve()))
        except ValueError:
            return str(path)

    def _error(self, what: str, e: BaseException) -> None:
        text = redact(f"{what}: {type(e).__name__}: {e}")
        self.state["errors"].append(text)
        self.echo(f"W&B: {text} (the job goes on with the local store)")

    def _save(self) -> None:
        self.state["updated_at"] = now()
        try:
            atomic_write_json(self.marker, self.state)
        except OSError as e:
            self.echo(f"W&B: cannot write {self.marker}: {e}")

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(run)``, reporting a failure instead of raising; an online failure switches to an
        offline run and retries there once."""
        if self.run is None:
            return None
        try:
            return fn(self.run)
        except Exception as e:  # noqa: BLE001
            self._error(what, e)
            if self._go_offline(f"{what} failed online"):
                try:
                    return fn(self.run)
                except Exception as e2:  # noqa: BLE001
                    self._error(f"{what} (offline)", e2)
            return None

    # ------------------------------------------------------------------------------ metrics
    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.local.log(metrics, step)
        data = dict(metrics)
        self._call("log", lambda run: run.log(data, step=step))

    # ------------------------------------------------------------------------------ lineage
    def _input_alias(self, version: ArtifactVersion) -> str:
        """The alias that names ``version`` as this job's upstream job logged it."""
        upstream = [f"job-{u.job_key[:16]}" for b in self.record.inputs for u in b.upstream]
        for alias in upstream:
            if alias in version.aliases:
                return alias
        if version.producer is not None:
            return f"job-{version.producer.job_key[:16]}"
        return "latest"

    def use_input(self, version: ArtifactVersion, path: Path) -> None:
        wname = wandb_artifact_name(version.ref.name)
        entry = {
            "ref": str(version.ref),
            "artifact": wname,
            "alias": self._input_alias(version),
            "type": version.type,
            "digest": version.digest,
            "linked": False,
        }
        self.state["inputs"].append(entry)
        if self.run is not None and self.online:
            self._use_online(entry)
        refs = [f"{e['artifact']}:{e['alias']}" for e in self.state["inputs"]]
        self._call("recording inputs in the config", lambda run: run.config.update({"inputs": refs}, allow_val_change=True))
        self._save()

    def _use_online(self, entry: dict[str, Any]) -> None:
        """Declare the input in W&B (its lineage edge). Not found or unreachable: left for ``sync``."""
        try:
            art = self.run.use_artifact(f"{entry['artifact']}:{entry['alias']}", type=entry["type"])
        except Exception as e:  # noqa: BLE001 - e.g. the producer ran offline and is not synced yet
            self._error(f"use_artifact {entry['artifact']}:{entry['alias']} (sync links it later)", e)
            return
        entry["linked"] = True
        theirs = ((getattr(art, "metadata", None) or {}).get("orchestrator") or {}).get("digest")
        if theirs and theirs != entry["digest"]:
            self.echo(
                f"W&B: {entry['artifact']}:{entry['alias']} in W&B has digest {theirs[:12]}, the local "
                f"mirror's {entry['ref']} has {entry['digest'][:12]}; the job uses the local one"
            )

    def log_output(self, version: ArtifactVersion, path: Path) -> None:
        wname = wandb_artifact_name(version.ref.name)
        entry: dict[str, Any] = {
            "ref": str(version.ref),
            "artifact": wname,
            "type": version.type,
            "digest": version.digest,
            "aliases": self._aliases(version),
            "logged": False,
            "wandb_digest": None,
        }
        self.state["outputs"].append(entry)
        try:
            art = self._artifact(version, wname, path) if self.run is not None else None
        except Exception as e:  # noqa: BLE001 - a local problem: no reason to leave online mode
            self._error(f"preparing artifact {wname}", e)
            art = None
        if (
            art is not None
            and self._call(f"log_artifact {wname}", lambda run: run.log_artifact(art, aliases=entry["aliases"])) is not None
        ):
            entry["logged"] = True
            entry["wandb_digest"] = getattr(art, "digest", None)
        entry["media"] = self._log_media(version, path)
        self._save()

    def _log_media(self, version: ArtifactVersion, path: Path) -> list[str]:
        """Show the version's images and pages in the run (``orchestrator.tracking.media``); the keys logged."""
        if self.run is None:
            return []
        output = next((o.name for o in self.record.outputs if o.artifact == version.ref.name), version.type)
        items, notes = select_media(output, path, ((f.path, f.size) for f in version.files))
        for note in notes:
            self.echo(f"W&B: {note}")
        if not items:
            return []
        try:
            media = wandb_media(self.wandb, items, path)
        except Exception as e:  # noqa: BLE001 - e.g. an image PIL cannot read: the artifact has it anyway
            self._error(f"preparing media of {version.ref}", e)
            return []
        logged = self._call(f"logging media of {version.ref}", lambda run: run.log(media) or True)
        return sorted(media) if logged else []

    def _aliases(self, version: ArtifactVersion) -> list[str]:
        own = [f"study-{self.record.study}", f"job-{self.record.key[:16]}"]
        aliases = list(dict.fromkeys([*version.aliases, *own]))
        return [a for a in aliases if a and not ALIAS_FORBIDDEN & set(a)]

    def _artifact(self, version: ArtifactVersion, wname: str, path: Path) -> Any:
        p = version.producer
        lineage = {
            "ref": str(version.ref),
            "digest": version.digest,
            "created_at": version.created_at,
            "study": self.record.study,
            "job_key": self.record.key,
            "job_label": self.record.label,
            "stage": self.record.stage,
            "inputs": [e["ref"] for e in self.state["inputs"]],
            "inputs_wandb": [f"{e['artifact']}:{e['alias']}" for e in self.state["inputs"]],
            "provenance": dict(p.provenance) if p else {},
        }
        art = self.wandb.Artifact(name=wname, type=version.type, metadata={**dict(version.metadata), "orchestrator": lineage})
        if self.record.tracking.reference_artifacts:
            for f in version.files:  # not uploaded: W&B records file:// URIs, sizes and checksums
                art.add_reference(f"file://{(path / f.path).resolve()}", name=f.path)
        else:  # the store's materialized files are read-only and permanent: no staging copy needed
            art.add_dir(str(path), policy="immutable")
        return art

    # ------------------------------------------------------------------------------- finish
    def finish(self, ok: bool) -> None:
        self.local.finish(ok)
        if self.run is not None:
            uploaded = self._finish_one(self.run, ok, online=self.online)
            if self.online and uploaded:
                for r in self.state["runs"]:
                    if r["dir"] == self._rel(self._run_dir()):
                        r["uploaded"] = True
        self.run = None
        self.state["finished"] = True
        self._save()
        if self.state["runs"]:  # for `sync --watch`: this job's runs can be uploaded now
            try:
                write_ready(self.paths, self.record.key, {"run_id": self.run_id, "ok": ok, "at": now()})
            except OSError as e:
                self.echo(f"W&B: cannot write the sync trigger: {e}")

    def _finish_one(self, run: Any, ok: bool, online: bool) -> bool:
        try:
            run.finish(exit_code=0 if ok else 1)
            return True
        except Exception as e:  # noqa: BLE001 - incl. TimeoutError from finish_timeout_raises
            self._error("finish" + (" (upload incomplete; sync the study later)" if online else ""), e)
            return False
