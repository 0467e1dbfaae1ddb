"""Publish a fetched, verified bundle to the Hugging Face Hub.

The upload runs on the laptop, after ``publish/`` has come home and its ``SHA256SUMS`` checked,
not on the instance:

- the bundle is small (a Flux LoRA is tens of MB, samples a few MB), so the laptop's uplink is
  enough, and the instance can be destroyed as soon as the bundle is verified instead of billing
  while an upload runs;
- ``HF_TOKEN`` with write scope never has to be sent to a rented machine for publishing;
- the trade-off: a slow laptop uplink makes the push slower than from a datacenter, and a laptop
  that goes to sleep interrupts it (re-running ``flux-remote publish`` finishes it: it is
  idempotent).

Order on the Hub: the repo is created (private by default, ``exist_ok``), the model card
``README.md`` is committed first so the repo page renders as soon as it exists, then every other
file of the bundle in one commit. A re-run with identical files creates no new commit (the Hub's
preupload answer carries each file's oid and ``huggingface_hub`` drops unchanged files).
The repo URL is written into the bundle's ``receipt.json`` (``hf_repo_url``, with ``SHA256SUMS``
updated to match) before the upload, so the receipt at home and on the Hub both carry it.

``huggingface_hub`` is imported inside the functions: the CLI must start fast without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.errors import CredentialsError, ProviderError, RunError
from controller.redact import redact

CARD = "README.md"
SUMS = "SHA256SUMS"
RECEIPT = "receipt.json"
TOKEN_ENV = "HF_TOKEN"
_TOKEN_PAGE = "https://huggingface.co/settings/tokens"


@dataclass(frozen=True)
class BundleFiles:
    """The files of a verified bundle, relative POSIX paths; ``card`` is uploaded first."""

    root: Path
    card: str
    rest: list[str]


def resolve_token(token: str | None) -> str:
    """The token from the argument or ``HF_TOKEN``; never from huggingface_hub's saved login."""
    value = token or os.environ.get(TOKEN_ENV, "")
    if not value.strip():
        raise CredentialsError(
            "no Hugging Face token: set HF_TOKEN to publish",
            hint=f"create a token with write access at {_TOKEN_PAGE}, then export HF_TOKEN=...",
        )
    return value.strip()


def read_sums(bundle_dir: Path) -> dict[str, str]:
    """``SHA256SUMS`` (sha256sum's ``<hex>  <path>`` lines) as path -> hex."""
    from controller.run.fetch import is_inside, parse_sums

    sums_path = bundle_dir / SUMS
    try:
        text = sums_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RunError(f"{bundle_dir}: no {SUMS}; this is not a fetched bundle") from exc
    sums = {}
    for number, (digest, name) in enumerate(parse_sums(text), start=1):
        if not is_inside(name):
            raise RunError(f"{sums_path}: entry {number} names a path outside the bundle: {name!r}")
        sums[name] = digest
    return sums


def verify_bundle(bundle_dir: Path) -> BundleFiles:
    """Check every file listed in ``SHA256SUMS``; return the files to upload, card first."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise RunError(f"{bundle_dir}: no such bundle folder")
    from controller.run.fetch import verify_sums

    sums = read_sums(bundle_dir)
    try:
        verify_sums(bundle_dir)  # every listed file is a regular file that matches, no links
    except RunError as exc:
        raise RunError(str(exc.message), hint="fetch the bundle again before publishing") from exc
    if CARD not in sums:
        # only what SHA256SUMS lists (and so verified) is uploaded: an unlisted README.md could
        # be anything, a link to a file of this machine included
        raise RunError(f"{bundle_dir}: the model card ({CARD}) is not listed in {SUMS}",
                       hint="fetch the bundle again; a bundle the agent packed lists its card")
    rest = sorted(name for name in sums if name not in (CARD, SUMS))
    rest.append(SUMS)
    return BundleFiles(root=bundle_dir, card=CARD, rest=rest)


def record_repo_url(bundle_dir: Path, url: str) -> bool:
    """Put ``hf_repo_url`` into ``receipt.json`` and keep ``SHA256SUMS`` true to it.

    Returns whether anything changed (a re-run with the same URL changes nothing, so the Hub sees
    identical files). Both files are replaced atomically.
    """
    from controller.state import write_text_atomic
    from remote.plan import write_json_atomic
    from remote.publish.bundle import sha256_file

    receipt_path = bundle_dir / RECEIPT
    if not receipt_path.is_file():
        return False
    try:
        receipt = json.loads(receipt_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunError(f"{receipt_path}: not JSON: {exc}") from exc
    if not isinstance(receipt, dict) or receipt.get("hf_repo_url") == url:
        return False
    receipt["hf_repo_url"] = url
    write_json_atomic(receipt_path, receipt)
    sums = read_sums(bundle_dir)
    if RECEIPT in sums:
        sums[RECEIPT] = sha256_file(receipt_path)
        body = "".join(f"{digest}  {name}\n" for name, digest in sums.items())
        write_text_atomic(bundle_dir / SUMS, body, mode=0o644)
    return True


def publish_target(run: dict[str, Any] | None) -> dict[str, Any]:
    """``publish.hf_repo`` and ``publish.hf_private`` from the journal's copy of the spec the user
    launched (``run["spec_json"]``), or empty without a run.

    Never from the bundle: its ``run.yaml`` was written by the instance, which must not choose
    where (or how publicly) the user's files are pushed."""
    if not run:
        return {}
    try:
        spec = json.loads(run.get("spec_json") or "{}")
    except ValueError:
        return {}
    publish = spec.get("publish") if isinstance(spec, dict) else None
    if not isinstance(publish, dict):
        return {}
    return {key: publish[key] for key in ("hf_repo", "hf_private") if publish.get(key) is not None}


def publish_bundle(
    bundle_dir: Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a fetched bundle to ``repo_id`` on the Hub and return the repo URL.

    Idempotent: the repo is created with ``exist_ok`` (visibility is only set on creation), and
    unchanged files are not committed again. Raises ``CredentialsError`` for a missing or rejected
    token, ``ProviderError`` when the Hub fails, ``RunError`` when the bundle does not verify.
    The token appears in no message.
    """
    secret = resolve_token(token)
    files = verify_bundle(Path(bundle_dir))
    hub = endpoint or os.environ.get("HF_ENDPOINT") or None
    try:
        return _upload(files, repo_id, private=private, token=secret, endpoint=hub)
    except _hub_errors() as exc:
        raise _translate(exc, repo_id, secret) from exc


def _hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub and its HTTP client raise (httpx2 in hub 2.x, httpx in 1.x)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return (HfHubHTTPError, OfflineModeIsEnabled, http.HTTPError, OSError, ValueError)


def _upload(files: BundleFiles, repo_id: str, *, private: bool, token: str, endpoint: str | None) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="flux-remote")
    url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    if record_repo_url(files.root, url):
        files = verify_bundle(files.root)
    def add(name: str) -> CommitOperationAdd:
        return CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(files.root / name))

    api.create_commit(repo_id, operations=[add(files.card)], commit_message="Add model card",
                      repo_type="model")
    api.create_commit(repo_id, operations=[add(name) for name in files.rest],
                      commit_message="Upload flux-remote bundle", repo_type="model")
    return url


def _translate(exc: Exception, repo_id: str, token: str) -> Exception:
    """One place that turns huggingface_hub / transport failures into our errors, token redacted."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return ProviderError(
            "cannot publish: huggingface_hub offline mode is on", hint="unset HF_HUB_OFFLINE to publish"
        )
    response = exc.response if isinstance(exc, HfHubHTTPError) else None
    status = response.status_code if response is not None else None
    detail = redact(_first_line(exc), [token])
    if status in (401, 403):
        return CredentialsError(
            f"the Hugging Face Hub refused HF_TOKEN for {repo_id} (HTTP {status})",
            hint=f"HF_TOKEN needs write access to that namespace ({_TOKEN_PAGE})",
        )
    if status is not None:
        return ProviderError(f"publishing to {repo_id} failed: HTTP {status}: {detail}")
    if isinstance(exc, (ValueError, OSError)):
        return RunError(f"publishing to {repo_id} failed: {detail}")
    return ProviderError(f"cannot reach the Hugging Face Hub to publish {repo_id}: {detail}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
