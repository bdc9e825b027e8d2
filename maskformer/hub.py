"""Finding files: a local folder or a Hugging Face hub repo id, to a local path.

The bottom of the package's import graph: it imports nothing from maskformer, so configs,
checkpoints and the processor can all resolve their files without importing each other.
"""
from __future__ import annotations

import os
import re
import socket
import time
import urllib.parse
from typing import Dict, Optional, Tuple


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as it is: missing, corrupt, hostile, or not matching the config."""


# Keyword arguments every ``from_pretrained`` passes through to ``resolve_file``.
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "subfolder", "force_download")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


def check_relative_name(filename: str, what: str, hint: str = "") -> str:
    """``filename`` as a path relative to a checkpoint folder, or CheckpointError when it could
    reach outside it (absolute, a drive, ``..``, empty parts) or is not a string."""
    if not isinstance(filename, str):
        raise CheckpointError(f"{what} must be a file name (a string), got {filename!r}")
    parts = re.split(r"[\\/]", filename)
    if not filename or os.path.isabs(filename) or os.path.splitdrive(filename)[0] or filename.startswith(("/", "\\")) \
            or any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(
            f"{what} {filename!r} is not a plain file name inside the checkpoint folder (absolute paths, '..' and "
            f"empty path parts are refused){hint}"
        )
    return filename


# Proxy variables: with one set, the proxy resolves the hub's name, so a local lookup failure proves nothing.
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_UNREACHABLE: Dict[str, Tuple[float, Optional[str]]] = {}  # hub host -> (when checked, reason or None)
_UNREACHABLE_TTL_S = 60.0  # a network that comes back is noticed within a minute


def hub_unreachable_reason() -> Optional[str]:
    """Why the hub certainly cannot be reached now (its host name does not resolve and no proxy is
    set: no network, or no DNS), else None (it may be reachable: huggingface_hub then tries, with its
    retries). Without this, huggingface_hub retries a failed name lookup five times, 1+2+4+8+8 s, for
    every file a load asks for (41 s measured here for one config.json) before the cache is used or
    the load fails. One lookup per host, remembered for a minute."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    from huggingface_hub import constants  # optional (maskformer[hub]); only a hub id gets here

    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname
    if not host:
        return None
    checked = _UNREACHABLE.get(host)
    now = time.monotonic()
    if checked is not None and now - checked[0] < _UNREACHABLE_TTL_S:
        return checked[1]
    reason = None
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        certain = {socket.EAI_NONAME, socket.EAI_AGAIN, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
        if exc.errno in certain:
            reason = f"{host} does not resolve: {exc.strerror}"
    except OSError:
        pass
    _UNREACHABLE[host] = (now, reason)
    return reason


def resolve_file(path_or_repo_id, filename: str, *, required: bool = True, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, local_files_only: bool = False, token=None, subfolder: str = "",
                 force_download: bool = False) -> Optional[str]:
    """Return a local path to ``filename`` inside a folder or a hub repo, or None if absent and not required.

    ``subfolder``: the files live in this sub-folder of the folder or repo (as transformers'
    ``subfolder=``). A hub repo id is resolved through ``huggingface_hub.hf_hub_download`` (its
    cache, or the network unless ``local_files_only`` or ``HF_HUB_OFFLINE=1``; when the hub certainly
    cannot be reached, see ``hub_unreachable_reason``, the cache only, at once). ``filename`` must
    name a regular file inside the folder (no absolute path, no ``..``); a symbolic link is followed
    (the hub cache's snapshot folders are links to its blobs) but must end at a regular file, never
    a device or a pipe.
    """
    name = os.fspath(path_or_repo_id)
    subfolder = os.fspath(subfolder or "")
    if subfolder:
        subfolder = check_relative_name(subfolder.rstrip("/\\"), "subfolder")
    check_relative_name(filename, "file name")
    if os.path.isdir(name):
        folder = os.path.join(name, subfolder) if subfolder else name
        path = os.path.join(folder, filename)
        if os.path.lexists(path):
            if not os.path.isfile(os.path.realpath(path)):
                raise CheckpointError(f"{path!r} is not a regular file (a folder, device, pipe or broken link); refused")
            return path
        if required:
            raise FileNotFoundError(f"{filename} not found in the folder {folder!r}")
        return None
    if os.path.isfile(name):
        raise CheckpointError(f"{name!r} is a file; pass the folder that holds config.json and the weights")
    if _looks_local(name) or name.count("/") > 1:
        raise FileNotFoundError(f"no such folder {name!r} (nor is it a hub repo id such as 'facebook/maskformer-swin-base-ade')")
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
    except ImportError as exc:
        raise ImportError(
            f"{name!r} is not a local folder, and loading from the hub needs huggingface_hub: "
            "`pip install huggingface_hub`, or download the checkpoint and pass its folder"
        ) from exc
    unreachable = None
    if not local_files_only and not hub_constants.HF_HUB_OFFLINE:
        unreachable = hub_unreachable_reason()
        if unreachable is not None and force_download:
            raise FileNotFoundError(f"force_download=True needs the hub, which cannot be reached ({unreachable}); "
                                    f"connect to the network, or drop force_download to use the local cache of {name!r}")
    try:
        return huggingface_hub.hf_hub_download(
            name, filename, subfolder=subfolder or None, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only or unreachable is not None, token=token, force_download=force_download,
        )
    except hub_errors.LocalEntryNotFoundError as exc:
        if not required:
            # Offline with a partial cache: the file may exist upstream; report only if needed.
            return None
        why = unreachable or "offline, or HF_HUB_OFFLINE=1 / local_files_only=True"
        raise FileNotFoundError(
            f"{filename} of {name!r} is not in the local hub cache and the hub cannot be reached ({why}); download it "
            "once with network access or pass a local folder"
        ) from exc
    except hub_errors.EntryNotFoundError:  # after its subclass LocalEntryNotFoundError
        if required:
            raise FileNotFoundError(f"{filename} is not in the hub repo {name!r}") from None
        return None
    except hub_errors.RepositoryNotFoundError as exc:
        raise FileNotFoundError(f"hub repo {name!r} does not exist or is private (pass token=... for a private repo)") from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise FileNotFoundError(f"revision {revision!r} of hub repo {name!r} does not exist") from exc
