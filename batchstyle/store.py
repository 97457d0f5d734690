"""Object storage: every fsspec call batchstyle makes, so that a manifest, its inputs and a run's outputs may live
in a bucket (`s3://`, `gs://`, `az://`, `https://` read-only) as well as in folders.

The rest of the package keeps working on local files: an object read is first staged as a local copy (named by its
URL, ETag and size, so a changed object is fetched again and an unchanged one never twice on a node), and an output
is written locally and then put to its URL in one request, so that an object under an output's name is always whole
(S3, GCS and Azure make an object visible only once its upload completes). Credentials come only from the clients'
own defaults (environment, config files, instance roles) and are never written anywhere; URLs are shown without
userinfo or query strings, which is where a signed URL keeps its secrets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from batchstyle.errors import UnusableInput

T = TypeVar("T")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")  # two letters at least: C:\ is a Windows path, not a URL
RETRIES = 3  # tries of a call that failed for a cause a retry can help (the store unreachable, busy, throttling)
STAGING_ENV = "BATCHSTYLE_STAGING"
NO_SUCH_OBJECT = "no such object"  # the cause of a missing object, which some callers take as a miss


class StoreError(UnusableInput):
    """An object that could not be read or written: the URL (scrubbed) and the cause, in words."""

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"{scrub(url)}: {cause}")
        self.url = scrub(url)
        self.cause = cause


def is_url(text: str | os.PathLike[str]) -> bool:
    """A URL of a store (`file://` too): a scheme of two letters or more, then `://`."""
    return isinstance(text, str) and _SCHEME.match(text) is not None


def local_path(text: str) -> str:
    """A `file://` URL as the path it names; anything else as given."""
    return urlsplit(text).path if text.lower().startswith("file://") else text


def scrub(url: str) -> str:
    """The URL without userinfo, query or fragment: a signed URL's query is its credential."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]+://[^\s'\"]+")


def scrub_text(text: str) -> str:
    """`text` (a command line's argument, a label of flags) with every URL in it scrubbed, as the ledger keeps it:
    `--out=https://host/out?X-Amz-Signature=...` is a credential in a run's record otherwise."""
    return _URL_IN_TEXT.sub(lambda found: scrub(found.group(0)), text)


def join(base: str, cell: str) -> str:
    """A manifest cell resolved against the manifest's own URL: a URL stays as given, a relative name lands beside
    the manifest (`..` taken out, as a folder would)."""
    if is_url(cell):
        return cell
    parts = urlsplit(base)
    path = posixpath.normpath(posixpath.join(posixpath.dirname(parts.path), cell))
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def child(prefix: str, name: str) -> str:
    """`name` (a relative output name) under the prefix `prefix`."""
    return prefix.rstrip("/") + "/" + name.lstrip("/")


def name_of(url: str) -> str:
    return posixpath.basename(urlsplit(url).path.rstrip("/"))


def staging_root() -> Path:
    """Where this node keeps its local copies of objects: $BATCHSTYLE_STAGING, else `staging` in the cache. Each
    process (the driver, every worker or Ray actor) stages what it reads itself, so no folder need be shared."""
    from batchstyle.model.weights import default_cache_dir

    given = os.environ.get(STAGING_ENV)
    return Path(given).expanduser() if given else default_cache_dir() / "staging"


def output_copy(url: str) -> Path:
    """Where this node writes the output for `url` before putting it: in its own staging folder, never the
    driver's ledger folder, which a Ray actor on another node may not be able to create."""
    digest = hashlib.sha256(scrub(url).encode()).hexdigest()[:24]
    return staging_root() / "outputs" / digest / (name_of(url) or "output")


def work_dir(out_url: str, cache: Path | None = None) -> Path:
    """The local folder of a run whose outputs go to `out_url`: its ledger, its lock, and each output between being
    written and being put. Named after the URL, so the same command finds the same ledger."""
    from batchstyle.model.weights import default_cache_dir

    digest = hashlib.sha256(scrub(out_url).rstrip("/").encode()).hexdigest()[:16]
    return (cache or default_cache_dir()) / "remote-out" / digest


def _fs(url: str) -> tuple[Any, str]:
    """The file system and path of `url`, with no listing kept from before: fsspec keeps listings (and the sizes
    and ETags in them) for the life of the process, and a second run in one process saw none of the objects put
    since the first."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(path)
    except (ImportError, ValueError) as exc:
        scheme = urlsplit(url).scheme
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}.get(scheme)
        fix = f"pip install 'batchstyle[{extra}]'" if extra else "give a file path or an s3://, gs://, az:// URL"
        raise StoreError(url, f"cannot open {scheme}:// URLs ({exc}); {fix}") from None
    return fs, path


_FORBIDDEN = re.compile(r"\b403\b|Forbidden")


def _cause(exc: BaseException) -> tuple[str, bool]:
    """(the cause in words, whether a retry can help). Any URL the client's message quotes is scrubbed: an HTTP
    client's error names the URL it asked for, signature and all, and the cause goes to the ledger."""
    cause, transient = _cause_of(exc)
    return scrub_text(cause), transient


def _cause_of(exc: BaseException) -> tuple[str, bool]:
    cause = str(exc.__cause__ or "")
    text = f"{exc} {cause}"
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return "the bucket does not exist; create it, or fix the bucket's name", False
    # A FileNotFoundError's own message is the path (`photos/403.png` is no answer); fsspec's HTTP client raises one
    # for any refusal, the 403 in the error it chains.
    forbidden = _FORBIDDEN.search(cause if isinstance(exc, FileNotFoundError) else text)
    if isinstance(exc, PermissionError) or "AccessDenied" in text or forbidden:
        return "access denied (403); check the credentials and the bucket's policy for this object", False
    if isinstance(exc, FileNotFoundError):
        return NO_SUCH_OBJECT, False
    transient = ("Could not connect", "ConnectTimeout", "EndpointConnectionError", "Connection refused", "timed out")
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(word in text for word in transient):
        return f"the store is unreachable ({exc.__class__.__name__}); check the endpoint and the network", True
    if any(word in text for word in ("SlowDown", "Throttl", "ServiceUnavailable", "InternalError", " 500", " 503")):
        return f"the store is busy ({str(exc) or exc.__class__.__name__})", True
    return f"{exc.__class__.__name__}: {exc}", False


def _call(url: str, action: Callable[[], T]) -> T:
    """`action`, retried where a retry can help; any failure becomes one StoreError naming the URL and the cause."""
    for attempt in range(RETRIES):
        try:
            return action()
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - the clients raise many kinds; each is named by _cause
            cause, transient = _cause(exc)
            if not transient or attempt == RETRIES - 1:
                raise StoreError(url, cause) from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def stage(url: str, root: Path | None = None, info: Mapping[str, Any] | None = None) -> Path:
    """A local copy of the object, fetched once per node and version: named by the URL, ETag and size, written
    through a temp file, so that a copy under its name is always whole. `info`: the object's entry in a listing
    just made (`stage_all`), which saves asking the store for it."""
    fs, path = _fs(url)
    if info is None:
        info = _call(url, lambda: fs.info(path))
    if info.get("type") == "directory":
        raise StoreError(url, "is a prefix (a folder), not an object; give an object's URL")
    version = f"{scrub(url)}\0{info.get('ETag') or info.get('etag') or info.get('mtime')}\0{info.get('size')}"
    folder = (root or staging_root()) / hashlib.sha256(version.encode()).hexdigest()[:24]
    local = folder / (name_of(url) or "object")
    if local.is_file():
        return local
    _get_file(url, fs, path, local)
    return local


def _get_file(url: str, fs: Any, path: str, local: Path) -> None:
    """The object to `local` through a temp file beside it, renamed into place: a file under its name is whole."""
    local.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".staging-", dir=local.parent)
    os.close(handle)
    try:
        _call(url, lambda: fs.get_file(path, temp))
        os.replace(temp, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def get(url: str, local: Path) -> Path:
    """The object to the local file `local`, whole, replacing what is there. For the run's own work fetched back
    (a clip's frames, an output whose key is read): unlike an input, no later run reads it again from the staging
    cache, so it goes where the caller removes it once used rather than filling that cache."""
    fs, path = _fs(url)
    _get_file(url, fs, path, local)
    return local


STAGE_THREADS = 16  # objects fetched at once: each a GET (and a HEAD where no listing gave its ETag), mostly waiting


def _each(urls: Sequence[str], fetch: Callable[[str], Path]) -> dict[str, Path | StoreError]:
    """`fetch` of many objects at once, each URL's file or its error: the requests wait on the store's latency, not
    on this machine, so they overlap."""
    if not urls:
        return {}
    found: dict[str, Path | StoreError] = {}
    with ThreadPoolExecutor(max_workers=min(STAGE_THREADS, len(urls)), thread_name_prefix="batchstyle-stage") as pool:
        for url, future in [(url, pool.submit(fetch, url)) for url in dict.fromkeys(urls)]:
            try:
                found[url] = future.result()
            except StoreError as exc:
                found[url] = exc
    return found


def stage_all(
    urls: Sequence[str], root: Path | None = None, known: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Path | StoreError]:
    """`stage` of many objects at once, each URL's copy or its error: planning a night's 10,000 new photos waits on
    the store's latency, not on this machine, so the requests overlap. `known`: the objects' entries in a listing
    just made (the folder form lists a prefix to find its photos), whose ETags and sizes save a HEAD each, so a
    rerun over photos already staged asks the store for the listing alone."""
    entries = known or {}
    return _each(urls, lambda url: stage(url, root, entries.get(url)))


def get_all(wanted: Mapping[str, Path]) -> dict[str, Path | StoreError]:
    """`get` of many objects at once (URL -> local file), each URL's file or its error: a clip's frames fetched
    back, hundreds of small objects, overlap their requests as `stage_all` does."""
    return _each(list(wanted), lambda url: get(url, wanted[url]))


def put(local: Path, url: str) -> None:
    """The finished local file to its URL in one put: an object appears under the name whole, or not at all."""
    fs, path = _fs(url)
    if urlsplit(url).scheme in ("http", "https"):
        raise StoreError(url, "https:// is read-only; give an s3://, gs:// or az:// URL for outputs")
    _call(url, lambda: fs.put_file(str(local), path))


def fetch(url: str, local: Path) -> bool:
    """`get`, with False where there is no such object: a shared cache's miss, which is no error."""
    try:
        get(url, local)
    except StoreError as exc:
        if exc.cause == NO_SUCH_OBJECT:
            return False
        raise
    return True


def exists(url: str) -> bool:
    fs, path = _fs(url)
    found: bool = _call(url, lambda: fs.exists(path))
    return found


def delete(url: str) -> None:
    """The object at `url` removed: a frame a folder output's new assembly no longer holds, as a local folder
    replaced whole loses it."""
    fs, path = _fs(url)
    _call(url, lambda: fs.rm_file(path))


def names(prefix: str) -> frozenset[str]:
    """Every object's name under `prefix`, relative to it (a resume's one listing, not a request per row). A bucket
    that does not exist, or cannot be listed, raises StoreError; a prefix with nothing under it is empty."""
    fs, path = _fs(prefix)
    root = path.rstrip("/")

    def listing() -> list[str]:
        try:
            found: list[str] = fs.find(root)
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise
            return []
        return found

    return frozenset(found[len(root) + 1 :] for found in _call(prefix, listing) if found.startswith(root + "/"))


def check_writable(prefix: str) -> None:
    """Fails early, before any row runs, where the outputs' bucket does not exist or cannot be listed."""
    names(prefix)
