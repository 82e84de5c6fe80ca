"""Paths and URLs: the one place that knows whether a slide, store or table lives on object storage.

Every path argument of ``wsienc`` may be a local path or an fsspec URL (``s3://bucket/prefix/...``;
``gs://``, ``az://``/``abfs://`` when gcsfs/adlfs are installed; ``https://`` read-only, for slides).
Credentials and endpoint come from the standard environment of the filesystem package (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``) and from the JSON object in ``WSIENC_STORAGE_OPTIONS`` (what ``--storage-options``
sets; dask worker processes started afterwards inherit it, remote workers need it in their environment).

Error lines name the URL and the problem (bad URL, missing bucket, missing credentials, no such
object) and never the options: no secret is ever put in a message, a log, a store or a report.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from wsi_encoder.errors import InvalidParameterError, StoreError

#: Environment variable holding the JSON storage options (``--storage-options``).
STORAGE_OPTIONS_ENV = "WSIENC_STORAGE_OPTIONS"
#: Environment variable holding the retry count for object-store requests (``--retries``).
RETRIES_ENV = "WSIENC_RETRIES"
#: Retries of a failed object-store request when ``WSIENC_RETRIES`` is not set.
DEFAULT_RETRIES = 5
#: Bytes fetched per range request when reading a remote slide (neighbouring TIFF tiles share a request).
SLIDE_BLOCK_SIZE = 4 * 1024 * 1024
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_READ_ONLY = ("http", "https")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is a non-local fsspec URL (``file://`` counts as local)."""
    if isinstance(path, Path):
        return False
    match = _SCHEME.match(str(path))
    return match is not None and match.group(1).lower() != "file"


def as_local(path: str | Path) -> Path:
    """``path`` as a local :class:`~pathlib.Path` (``file://`` stripped, ``~`` expanded)."""
    text = str(path)
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    return Path(text).expanduser()


def normalize(path: str | Path) -> str | Path:
    """A URL as a clean string (no trailing slash), or a local path resolved."""
    if is_url(path):
        text = str(path)
        return text.rstrip("/") if not text.endswith("://") else text
    return as_local(path).resolve()


def join(base: str | Path, *parts: str) -> str | Path:
    """``base / part / ...`` for a local path or a URL."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(base).joinpath(*parts)


def name_of(path: str | Path) -> str:
    """The last component of a path or URL."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(path).name


def set_storage_options(options: str | dict[str, Any] | None) -> None:
    """Use ``options`` (a JSON object, or a dict) for every URL opened from now on, in this process and
    in the worker processes it starts (``--storage-options``)."""
    if options is None or options == "":
        os.environ.pop(STORAGE_OPTIONS_ENV, None)
        return
    value = parse_storage_options(options) if isinstance(options, str) else dict(options)
    os.environ[STORAGE_OPTIONS_ENV] = json.dumps(value)


def retries() -> int:
    """Retries of a failed object-store request: ``WSIENC_RETRIES`` (``--retries``), default :data:`DEFAULT_RETRIES`.

    For S3 this is botocore's ``max_attempts`` in its ``standard`` retry mode (500/502/503/504, throttling
    such as ``503 SlowDown``, connection errors; backoff ``random(0, 1) * 2**attempt`` seconds, at most
    20 s) and one more than the attempts of s3fs's own layer around each call, which also retries a
    response cut mid-body (backoff ``min(0.1 * 1.7**attempt, 15)`` seconds).
    """
    text = os.environ.get(RETRIES_ENV, "").strip()
    if not text:
        return DEFAULT_RETRIES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidParameterError(f"{RETRIES_ENV}={text!r}: the retry count must be a whole number >= 0")
    return value


def set_retries(count: int | None) -> None:
    """Use ``count`` retries for every object-store request from now on, here and in worker processes started later."""
    if count is None:
        os.environ.pop(RETRIES_ENV, None)
    else:
        os.environ[RETRIES_ENV] = str(int(count))


def check_writable(path: str | Path) -> None:
    """Raise :class:`InvalidParameterError` when ``path`` is a read-only URL (``http(s)://``)."""
    if is_url(path) and _protocol(path) in _READ_ONLY:
        raise InvalidParameterError(f"{path}: {_protocol(path)}:// is read-only; write to a local path or s3://")


def parse_storage_options(text: str) -> dict[str, Any]:
    """Parse ``--storage-options JSON`` (an object) or raise one clear line (without echoing it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(f"--storage-options is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise InvalidParameterError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def storage_options(url: str | Path) -> dict[str, Any]:
    """The fsspec options for ``url``: ``WSIENC_STORAGE_OPTIONS``, plus the endpoint from
    ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``) for S3 URLs when the options do not name one."""
    text = os.environ.get(STORAGE_OPTIONS_ENV, "")
    options = parse_storage_options(text) if text else {}
    if _protocol(url) in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": retries(), "mode": "standard"})
        options["config_kwargs"] = config
    return options


def _set_library_retries(fs: Any) -> Any:
    """Give s3fs's own retry layer ``retries() + 1`` attempts (it has no constructor option for it)."""
    if hasattr(fs, "retries") and type(fs).__name__ == "S3FileSystem":
        fs.retries = retries() + 1
    return fs


def _protocol(url: str | Path) -> str:
    match = _SCHEME.match(str(url))
    return match.group(1).lower() if match else "file"


def filesystem(url: str | Path) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path inside it.

    Raises
    ------
    InvalidParameterError
        Unknown scheme, or its filesystem package is not installed.
    """
    import fsspec

    protocol = _protocol(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = _PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
        raise InvalidParameterError(f"{url}: reading {protocol}:// needs {package} (pip install {package})") from None
    except ValueError:
        raise InvalidParameterError(f"{url}: unknown URL scheme {protocol!r} (use a local path, s3://, gs://, az:// or https://)") from None
    try:
        fs, inner = fsspec.core.url_to_fs(str(url), **storage_options(url))
        return _set_library_retries(fs), inner
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{url}: bad URL or storage options ({type(exc).__name__})") from None


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^@\s]+@")  # secrets may hold "/"
_QUERY = re.compile(r"(://[^\s?'\"]*)\?[^\s'\"]*")


def redact(text: str) -> str:
    """``text`` with the user info (``user:secret@``) and query strings (signatures, SAS tokens) of its URLs
    replaced by ``***``."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", text))


def describe_error(url: str | Path, exc: BaseException) -> str:
    """One line naming ``url`` and what is wrong with reaching it (no option values, no secrets: user info
    and query strings of URLs are redacted)."""
    return redact(_describe_error(url, exc))


def _describe_error(url: str | Path, exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return f"{url}: no credentials for object storage (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or --storage-options '{{\"anon\": true}}' for a public bucket)"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower() or name == "NoSuchBucket":
        return f"{url}: the bucket does not exist (or is not visible with these credentials)"
    if any(k in text for k in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403")) or isinstance(
        exc, PermissionError
    ):
        return f"{url}: access denied (check the credentials and the bucket policy)"
    if "EndpointConnectionError" in name or "Could not connect" in text or "Cannot connect" in text:
        return f"{url}: cannot reach the object store endpoint (check AWS_ENDPOINT_URL / --storage-options endpoint_url)"
    if isinstance(exc, FileNotFoundError):
        return f"{url}: no such file or object"
    first = text.strip().splitlines()[0][:200] if text.strip() else name
    return f"{url}: {name}: {first}"


def check_bucket(url: str) -> None:
    """Raise :class:`StoreError` with one clear line when ``url``'s bucket cannot be reached or written."""
    if _protocol(url) in _READ_ONLY:
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)  # one HEAD request; exists() would hide missing credentials
    except FileNotFoundError:
        raise StoreError(describe_error(url, FileNotFoundError("NoSuchBucket"))) from None
    except PermissionError:
        return  # credentials without s3:ListBucket may still read and write objects: the operation decides
    except Exception as exc:
        raise StoreError(describe_error(url, exc)) from None


def exists(path: str | Path) -> bool:
    """Whether a local path or a URL exists (a file, or a prefix with objects)."""
    if not is_url(path):
        return as_local(path).exists()
    fs, inner = filesystem(path)
    try:
        return bool(fs.exists(inner))
    except Exception as exc:
        raise StoreError(describe_error(path, exc)) from None


def is_file(path: str | Path) -> bool:
    """Whether ``path`` is a file (an object, for URLs)."""
    if not is_url(path):
        return as_local(path).is_file()
    fs, inner = filesystem(path)
    try:
        return bool(fs.isfile(inner))
    except Exception as exc:
        raise StoreError(describe_error(path, exc)) from None


def list_files(prefix: str, suffixes: tuple[str, ...], skip_dirs: tuple[str, ...] = (".zarr",)) -> list[str]:
    """Every object under ``prefix`` whose name ends with one of ``suffixes``, sorted, as URLs.

    One recursive listing (a few paged LIST requests per 1000 objects), never one per folder; hidden
    names and anything inside a ``skip_dirs`` folder (zarr stores) are skipped.
    """
    fs, inner = filesystem(prefix)
    scheme = _protocol(prefix)
    try:
        names = fs.find(inner)
    except Exception as exc:
        raise StoreError(describe_error(prefix, exc)) from None
    found = []
    for name in names:
        rel = name[len(inner.rstrip("/")) :].strip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or any(p.lower().endswith(skip_dirs) for p in parts[:-1]):
            continue
        if parts[-1].lower().endswith(suffixes):
            found.append(f"{scheme}://{name}")
    return sorted(found)


def open_file(path: str | Path, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """Open a local file or an object (an fsspec file) for reading or writing."""
    if not is_url(path):
        return open(as_local(path), mode, **kwargs)
    if any(c in mode for c in "wax+"):
        check_writable(path)
    fs, inner = filesystem(path)
    try:
        return fs.open(inner, mode, **kwargs)
    except Exception as exc:
        raise StoreError(describe_error(path, exc)) from None


def zarr_store(path: str | Path, read_only: bool = False) -> Any:
    """What ``zarr.open_group`` takes for ``path``: the local path as a string, or a zarr v3
    ``FsspecStore`` for a URL (object stores: no renames; every chunk one PUT)."""
    if not is_url(path):
        return str(as_local(path))
    if not read_only:
        check_writable(path)
    from zarr.storage import FsspecStore

    filesystem(path)  # a clear line for an unknown scheme or a missing package
    store = FsspecStore.from_url(str(path), storage_options=storage_options(path), read_only=read_only)
    _set_library_retries(store.fs)
    return store


@contextmanager
def local_copy(path: str | Path) -> Iterator[Path]:
    """A local file or folder holding what ``path`` holds: ``path`` itself, or for a URL a temporary
    copy (removed at exit). For small inputs read by local-only libraries (labels CSVs, model folders)."""
    if not is_url(path):
        yield as_local(path)
        return
    fs, inner = filesystem(path)
    tmp = Path(tempfile.mkdtemp(prefix="wsienc-"))
    try:
        target = tmp / name_of(path)
        try:
            if fs.isdir(inner):
                fs.get(inner.rstrip("/") + "/", str(target), recursive=True)
            else:
                fs.get(inner, str(target))
        except Exception as exc:
            raise StoreError(describe_error(path, exc)) from None
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_FETCHED: dict[str, Path] = {}
_FETCHED_LOCK = threading.Lock()
_FETCHED_HELD = ExitStack()
atexit.register(_FETCHED_HELD.close)


def fetched_copy(path: str | Path) -> Path:
    """``path`` itself, or for a URL a local copy fetched once per process (by :func:`local_copy`) and removed
    when the process exits. For inputs every worker process opens, such as ``--weights`` files and
    ``--tissue-mask`` folders: each process fetches them once, however many tasks it runs."""
    if not is_url(path):
        return as_local(path)
    key = str(path)
    with _FETCHED_LOCK:
        if key not in _FETCHED:
            _FETCHED[key] = _FETCHED_HELD.enter_context(local_copy(key))
        return _FETCHED[key]


@contextmanager
def local_output(path: str | Path) -> Iterator[Path]:
    """A local path to write an output file or folder to: ``path`` itself, or for a URL a temporary
    path whose content is uploaded to ``path`` at exit (also when the writer failed, so partial
    reports are kept as they would be on disk). What ``path`` already holds is fetched first, so a
    command that resumes from its output folder resumes from the object store too. For small outputs
    (reports, CSVs, models, pictures)."""
    if not is_url(path):
        yield as_local(path)
        return
    check_writable(path)
    check_bucket(str(path))
    fs, inner = filesystem(path)
    # A staging folder of this run's own (two runs writing one URL never share or delete each other's);
    # records inside the folder name their files relative to it, so a later run resumes from its copy.
    digest = hashlib.sha256(str(normalize(path)).encode()).hexdigest()[:16]
    tmp = Path(tempfile.mkdtemp(prefix=f"wsienc-output-{digest}-"))
    target = tmp / name_of(path)
    try:
        if fs.isdir(inner):
            fs.get(inner.rstrip("/") + "/", str(target), recursive=True)
        elif fs.isfile(inner):
            fs.get(inner, str(target))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(describe_error(path, exc)) from None
    try:
        yield target
    finally:
        try:
            if target.is_dir():
                fs.put(str(target) + "/", inner.rstrip("/") + "/", recursive=True)
            elif target.exists():
                fs.put(str(target), inner)
        except Exception as exc:
            raise StoreError(f"{describe_error(path, exc)} (the output is kept in {target})") from None
        shutil.rmtree(tmp, ignore_errors=True)
