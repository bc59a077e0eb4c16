"""What W&B tracking, ``sync`` and ``sync --watch`` share without importing wandb: run ids and
artifact names, the per-job marker ``wandb-run.json``, the per-study ``wandb-ready/`` triggers,
credentials from the environment or a ``.env`` file, the requested mode, and ending wandb's
service process within a bounded time.

**Triggers.** When a job's W&B run ends, ``WandbRun.finish`` drops ``studies/<study>/wandb-ready/<key>``
(written atomically): ``sync --watch`` reads that one folder each round instead of every job's
directory, uploads the run and removes the trigger.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from types import ModuleType
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.fsutil import atomic_write_json, read_json
from orchestrator.paths import StudyPaths
from orchestrator.procutil import children, kill_group

INSTALL_HINT = "pip install 'cross-lingual-subnets[wandb]'"
MARKER = "wandb-run.json"  # in the job's directory: what sync needs to know about the job's W&B runs
KEY_VAR = "WANDB_API_KEY"
WANDB_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}\Z")
READY_DIR = "wandb-ready"  # in the study's directory: a trigger per job whose W&B run ended
SERVICE_COMMAND = "wandb-core"  # the process wandb starts for its runs and API requests
SERVICE_END_S = 10.0  # how long ending that process may take before it is killed


def import_wandb() -> ModuleType:
    """The ``wandb`` package, or an error that says how to install it (never a silent fallback)."""
    try:
        import wandb
    except ImportError as e:
        raise OrchestratorError(
            f"tracking.backend=wandb needs the wandb package ({e}); install it with: {INSTALL_HINT}"
            " (or use --set tracking.backend=local)"
        ) from None
    return wandb


def end_service(wandb: ModuleType, wait_s: float = SERVICE_END_S) -> bool:
    """End wandb's service process (``wandb.teardown()``), waiting for it at most ``wait_s``.

    wandb's own exit hook waits for its service without a limit, and a service stuck on a server
    that does not answer would then hold the command for good, after it has printed its outcome.
    Past ``wait_s``, the service processes this process started are killed with their groups (each
    leads its own session), which ends the teardown. So is one that is still there after the
    teardown: a service that never finished starting, which wandb gave up on but left running
    (holding the command's stdout and stderr). Call it once nothing is left to upload. Returns
    False if a service had to be killed."""
    done = threading.Event()

    def teardown() -> None:
        with contextlib.suppress(Exception):
            wandb.teardown()
        done.set()

    threading.Thread(target=teardown, name="wandb-teardown", daemon=True).start()
    ended = done.wait(wait_s)
    left = children(os.getpid(), SERVICE_COMMAND)
    for pid in left:
        kill_group(pid)
    if not ended:
        done.wait(wait_s)
    return ended and not left


def run_id(study: str, job_key: str) -> str:
    """The job's W&B run id: the same on every attempt of the job, distinct across studies."""
    return hashlib.sha256(f"{study}/{job_key}".encode()).hexdigest()[:32]


def wandb_artifact_name(name: str) -> str:
    """``name`` if W&B accepts it as an artifact name, else a safe name with a hash of the original."""
    if WANDB_NAME.match(name):
        return name
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:111]
    return f"{safe}.{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def marker_path(paths: StudyPaths, job_key: str) -> Path:
    return paths.job(job_key).dir / MARKER


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def all_uploaded(marker: Mapping[str, Any]) -> bool:
    """Whether every run directory the marker lists reached W&B (online, or by ``wandb sync``)."""
    synced = set(marker.get("synced", []))
    return all(r.get("uploaded") or r["dir"] in synced for r in marker.get("runs", []))


# -------------------------------------------------------------------------------------- triggers
def ready_dir(paths: StudyPaths) -> Path:
    """``studies/<study>/wandb-ready/``: one trigger file per job whose W&B run has ended."""
    return paths.dir / READY_DIR


def write_ready(paths: StudyPaths, job_key: str, entry: Mapping[str, Any]) -> None:
    """Drop the job's trigger (atomically: a reader sees all of it or none)."""
    atomic_write_json(ready_dir(paths) / job_key, dict(entry), durable=False, compact=True)


def read_ready(paths: StudyPaths) -> dict[str, Path]:
    """Job key -> trigger file, for every trigger in the folder (not the writers' temporary files)."""
    try:
        names = os.listdir(ready_dir(paths))
    except OSError:
        return {}
    return {n: ready_dir(paths) / n for n in sorted(names) if not n.startswith(".")}


# ----------------------------------------------------------------------------------- credentials
def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file (``export``, quotes and ``#`` comments allowed)."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return values
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


def load_api_key(*dirs: Path, env: MutableMapping[str, str] = os.environ) -> bool:
    """Make ``WANDB_API_KEY`` available to wandb in ``env``: kept if already set, else read from the
    first ``.env`` file (in ``dirs`` order) that has it. Returns whether a key is available. The key
    itself is never returned, printed or written."""
    if env.get(KEY_VAR):
        return True
    for d in dirs:
        key = read_dotenv(Path(d) / ".env").get(KEY_VAR)
        if key:
            env[KEY_VAR] = key
            return True
    return False


def redact(text: str, env: Mapping[str, str] = os.environ) -> str:
    """``text`` with the API key (if any) replaced, for messages that may quote wandb's errors."""
    key = env.get(KEY_VAR)
    return text.replace(key, "***") if key else text


def requested_mode(tracking_mode: str | None, env: Mapping[str, str] = os.environ) -> str:
    """``online`` / ``offline`` / ``disabled``: the spec's ``tracking.mode``, else ``WANDB_MODE``."""
    if tracking_mode:
        return tracking_mode
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun"):
        return "offline"
    return "disabled" if mode == "disabled" else "online"

