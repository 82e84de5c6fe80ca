"""The writer lock of a store: ``<store>.lock``, a small JSON file (or object) beside the store.

Every command that writes a zarr store (``tile`` and ``predict --keep-stores`` their patch stores, ``encode``
and ``predict --keep-stores`` their embedding stores) holds :class:`StoreLock` for as long as it writes, so two
runs never interleave their writes into one store. The lock file records who holds it (``pid``, ``host``,
``started``); a second writer is refused with one line naming that holder. A lock left by a process that
died on this host is taken over; a lock held by a live process, or by any process on another host, is
respected until it is released (or deleted by hand when its run is known to be gone).

On object storage (``s3://...``) the lock object is created with a conditional PUT (``If-None-Match: *``,
honoured by S3, MinIO and Ceph), so of two runs starting at once exactly one gets it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from wsi_encoder.errors import StoreError
from wsi_encoder.io.urls import check_writable, describe_error, filesystem, is_url, normalize

logger = logging.getLogger(__name__)

__all__ = ["StoreLock"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """An exclusive writer lock on a store: the file (or object) ``<store>.lock`` beside it.

    The lock records the holder's pid, host and start time. A lock left by a process that died
    (kill -9, power loss) on this host is taken over; a live holder, or one on another host, makes
    :meth:`acquire` raise :class:`~wsi_encoder.errors.StoreError` naming it and the lock to delete.
    On object storage the lock object is created with a conditional PUT (``If-None-Match: *``, which
    S3, MinIO and Ceph honour), so of two runs starting at once exactly one gets it.
    """

    def __init__(self, store_path: str | Path) -> None:
        store = normalize(store_path)
        check_writable(store)
        self.remote = is_url(store)
        self.path: Path | str = f"{store}.lock" if self.remote else Path(store).with_name(Path(store).name + ".lock")
        self._held = False

    def _create(self, record: dict[str, Any]) -> None:
        """Create the lock, raising FileExistsError when it exists."""
        if self.remote:
            fs, inner = filesystem(self.path)
            try:
                with fs.open(inner, "xb") as handle:
                    handle.write(json.dumps(record).encode())
            except FileExistsError:
                raise
            except Exception as exc:
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    raise FileExistsError(str(self.path)) from None
                raise StoreError(describe_error(self.path, exc)) from None
            return
        assert isinstance(self.path, Path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)

    def _delete(self) -> None:
        if self.remote:
            fs, inner = filesystem(self.path)
            fs.rm(inner)
        else:
            assert isinstance(self.path, Path)
            self.path.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock or raise :class:`~wsi_encoder.errors.StoreError`."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "token": uuid.uuid4().hex}  # fmt: skip
        for _ in range(2):
            try:
                self._create(record)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder.get("token") == record["token"]:
                    # Our own create took effect but its answer was lost (a reset), and the retry was refused.
                    self._held = True
                    return
                if holder and holder.get("host") == record["host"] and not _pid_alive(int(holder.get("pid", -1))):
                    logger.warning("taking over the lock %s left by dead process %s", self.path, holder.get("pid"))
                    self._delete()
                    continue
                who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}" if holder else "unknown"
                raise StoreError(
                    f"{str(self.path)[: -len('.lock')]}: another wsienc run is writing this store ({who}); wait for it "
                    f"to finish, or if no such run is alive, delete {self.path}"
                ) from None
            self._held = True
            return
        raise StoreError(f"{self.path}: could not take the store lock; delete it if no wsienc run is writing the store")

    def _holder(self) -> dict[str, Any] | None:
        try:
            if self.remote:
                fs, inner = filesystem(self.path)
                value = json.loads(fs.cat_file(inner))
            else:
                assert isinstance(self.path, Path)
                value = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def release(self) -> None:
        """Drop the lock (only if this process holds it)."""
        if self._held:
            holder = self._holder()
            if holder is None or (holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()):
                try:
                    self._delete()
                except FileNotFoundError:
                    pass
            self._held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
