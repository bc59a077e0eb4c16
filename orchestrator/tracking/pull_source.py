"""Where ``pull`` reads from: a W&B project, through the public API of the ``wandb`` client
(``wandb.Api().artifact(...)`` and ``Artifact.download``), with every failure turned into one line
that says what to do (credentials, network, entity/project spelling, a missing index)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.tracking.index import INDEX_FILE, index_artifact_name
from orchestrator.tracking.wandb_files import KEY_VAR, end_service, import_wandb, load_api_key, redact

TIMEOUT_VAR = "ORCHESTRATOR_WANDB_API_TIMEOUT"  # seconds for each W&B API request (default 30)
DEFAULT_TIMEOUT_S = 30
SERVICE_START_WORDS = "Failed to read port info"  # wandb: its wandb-core process did not start in time
_NETWORK_WORDS = ("did not respond", "timed out", "timeout", "connection", "unreachable", "name or service", "refused")


class PullError(OrchestratorError):
    """Pulling from W&B failed; the message says what to do."""


def _timeout() -> int:
    try:
        value = int(os.environ.get(TIMEOUT_VAR, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def _message(e: BaseException) -> str:
    return redact(" ".join(str(e).split()) or type(e).__name__)[:300]


def _network(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in _NETWORK_WORDS)


class WandbProject:
    """One W&B ``entity/project``, read through ``wandb.Api``. ``dirs``: where to look for a ``.env``
    file holding ``WANDB_API_KEY`` when the environment has none."""

    def __init__(self, entity: str, project: str, *dirs: Path) -> None:
        self.entity, self.project = entity, project
        self.wandb = import_wandb()
        load_api_key(*dirs)
        self.base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        self._api: Any = None

    @property
    def path(self) -> str:
        return f"{self.entity}/{self.project}"

    def close(self) -> None:
        """End wandb's service, if the API started one (bounded: see ``end_service``)."""
        end_service(self.wandb)

    def api(self) -> Any:
        """The logged-in ``wandb.Api`` (made once)."""
        if self._api is None:
            try:
                with _quiet():
                    self._api = self.wandb.Api(overrides={"entity": self.entity, "project": self.project}, timeout=_timeout())
            except Exception as e:  # noqa: BLE001 - wandb raises many kinds; each becomes one line
                raise self._login_error(e) from None
        return self._api

    def _login_error(self, e: BaseException) -> PullError:
        text = _message(e)
        if SERVICE_START_WORDS in text:  # wandb's own background process, not the server
            return PullError(f"wandb's service process did not answer ({text}); pull again (it resumes)")
        if _network(text):
            return PullError(
                f"W&B at {self.base_url} did not answer ({text}); check the network and WANDB_BASE_URL, then pull again"
            )
        if not os.environ.get(KEY_VAR):
            return PullError(
                f"no W&B credentials ({text}); set {KEY_VAR} (in the environment or a .env file) or run `wandb login`"
            )
        return PullError(
            f"W&B at {self.base_url} refused the login ({text}); check {KEY_VAR} (or run `wandb login`) and WANDB_BASE_URL"
        )

    def artifact(self, name: str, alias: str, *, study: str) -> Any:
        """The W&B artifact ``name:alias`` of this project."""
        api = self.api()
        try:
            with _quiet():
                return api.artifact(f"{self.path}/{name}:{alias}")
        except Exception as e:  # noqa: BLE001
            raise self._fetch_error(e, name, alias, study) from None

    def _fetch_error(self, e: BaseException, name: str, alias: str, study: str) -> PullError:
        text = _message(e)
        if "project" in text and "not found" in text:
            return PullError(
                f"W&B has no project {self.path} that this key can read ({text}); check the entity/project spelling"
                f" (ENTITY/PROJECT as in the W&B URL) and that {KEY_VAR} belongs to a member"
            )
        if "not found" in text and name == index_artifact_name(study):
            return PullError(
                f"W&B project {self.path} has no index of study {study!r} (artifact {name}:{alias}); run"
                f" `orchestrator track {study}` where the study's store is (then `orchestrator sync {study}` if it"
                " tracked offline), and pull again"
            )
        if "not found" in text:
            return PullError(
                f"W&B project {self.path} has no artifact {name}:{alias}, which the index of study {study!r} lists;"
                f" run `orchestrator track {study}` (and `sync`) where the study's store is, then pull again"
            )
        if _network(text):
            return PullError(f"W&B at {self.base_url} did not answer for {name}:{alias} ({text}); pull again later (it resumes)")
        return PullError(f"W&B could not give {self.path}/{name}:{alias}: {text}")

    def download(self, artifact: Any, dest: Path) -> None:
        """Every file of ``artifact`` into the empty folder ``dest`` (no W&B cache involved)."""
        try:
            with _quiet():
                artifact.download(root=str(dest), skip_cache=True)
        except Exception as e:  # noqa: BLE001
            text = _message(e)
            hint = "check the network, then pull again (it resumes)" if _network(text) else "pull again (it resumes)"
            raise PullError(f"downloading {artifact.name} from W&B project {self.path} failed ({text}); {hint}") from None

    def index_file(self, study: str, dest: Path) -> Path:
        """The study index's ``index.json``, downloaded into ``dest``."""
        name = index_artifact_name(study)
        art = self.artifact(name, "latest", study=study)
        self.download(art, dest)
        path = dest / INDEX_FILE
        if not path.is_file():
            raise PullError(f"W&B artifact {self.path}/{name}:latest holds no {INDEX_FILE}; it is not a study index")
        return path


@contextlib.contextmanager
def _quiet() -> Any:
    """wandb's own progress and log lines off (``pull`` prints one line per artifact itself)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield
