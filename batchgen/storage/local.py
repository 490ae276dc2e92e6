"""The file backend: keys are paths under a root folder.

Writes go to a hidden temporary file in the target's folder and are then published in one step, so readers
never see a partial object: ``os.replace`` for plain puts, ``os.link`` for ``if_absent`` puts (link fails
with EEXIST if the name exists, which makes it a true conditional create even between processes and hosts
sharing a POSIX file system). ``if_match`` puts compare the object's change token and replace it while holding
an ``flock`` on a hidden lock file beside it, so two conditional writers cannot both win. The lock file is removed
on release; one whose holder was killed stays until the next conditional writer of that object takes and removes
it. ``leftovers`` lists what interrupted writers left (``batchgen verify`` reports them).

The etag is a change token, ``<inode>-<mtime ns>-<size>``: publishing by rename or link keeps the temporary
file's inode and mtime, so the token of what was written is known before it becomes visible.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchgen.core.errors import AlreadyExistsError, ChangedError, NotFoundError, StorageError
from batchgen.storage.base import ObjectInfo, Storage

log = logging.getLogger("batchgen.storage.local")

# Temporary files live beside their target (rename is only atomic within one file system) and are
# skipped by listings. A crashed writer can leave one behind; it is never mistaken for an object.
TEMP_PREFIX = ".batchgen-tmp-"


def validate_key(key: str, uri: str) -> str:
    """Reject keys that would escape the root or alias another key on either backend."""
    if not isinstance(key, str) or not key:
        raise StorageError(f"{uri}: empty object key")
    parts = key.split("/")
    if key.startswith("/") or key.endswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"{uri}: invalid object key {key!r} (no leading/trailing '/', empty, '.' or '..' parts)")
    if "\\" in key or "\x00" in key:
        raise StorageError(f"{uri}: invalid object key {key!r} (backslash or NUL)")
    if any(p.startswith(TEMP_PREFIX) for p in parts):
        raise StorageError(f"{uri}: invalid object key {key!r} (reserved prefix {TEMP_PREFIX!r})")
    return key


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key, self.uri)

    def _where(self, key: str) -> str:
        return f"{self.uri}/{key}"

    # -- writes -------------------------------------------------------------------------------------------

    def _temp_path(self, final: Path) -> Path:
        return final.parent / f"{TEMP_PREFIX}{final.name}.{uuid.uuid4().hex}"

    def _publish(self, temp: Path, final: Path, key: str, if_absent: bool, if_match: str | None) -> None:
        """Make a fully written temporary file visible under its final name, then drop the temp name."""
        try:
            if if_match is not None:
                self._replace_if_match(temp, final, key, if_match)
            elif if_absent:
                try:
                    os.link(temp, final)
                except FileExistsError:
                    raise AlreadyExistsError(f"{self._where(key)} already exists") from None
                except OSError as e:
                    if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise StorageError(
                            f"{self._where(key)}: the file system does not support hard links, which "
                            "conditional creates need"
                        ) from e
                    raise
                temp.unlink()
            else:
                os.replace(temp, final)
            _fsync_dir(final.parent)
        finally:
            temp.unlink(missing_ok=True)

    def _replace_if_match(self, temp: Path, final: Path, key: str, if_match: str) -> None:
        with _exclusive(final.parent / f"{TEMP_PREFIX}lock-{final.name}"):
            current = _token(final)
            if current != if_match:
                raise ChangedError(f"{self._where(key)} changed (etag {current}, expected {if_match})")
            os.replace(temp, final)

    def _write_via_temp(self, key: str, if_absent: bool, fill, if_match: str | None = None) -> str:
        final = self._path(key)
        if if_absent and final.exists():
            # Cheap early exit; the link below is what actually decides.
            raise AlreadyExistsError(f"{self._where(key)} already exists")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            temp = self._temp_path(final)
            try:
                fill(temp)
                etag = _stat_token(temp.stat())
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            self._publish(temp, final, key, if_absent, if_match)
            return etag
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot write {self._where(key)}: {e.strerror or e}") from e

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
        content_type: str | None = None,
    ) -> str:
        def fill(temp: Path) -> None:
            with open(temp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        return self._write_via_temp(key, if_absent, fill, if_match)

    def put_file(self, key: str, path: str | Path, *, if_absent: bool = False, content_type: str | None = None) -> None:
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"cannot upload {source} to {self._where(key)}: not a file")

        def fill(temp: Path) -> None:
            with open(source, "rb") as src, open(temp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
                dst.flush()
                os.fsync(dst.fileno())

        self._write_via_temp(key, if_absent, fill)

    # -- reads --------------------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"{self._where(key)} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {self._where(key)}: {e.strerror or e}") from e

    def get_file(self, key: str, path: str | Path) -> None:
        source = self._path(key)
        dest = Path(path)
        temp = dest.parent / f"{TEMP_PREFIX}{dest.name}.{uuid.uuid4().hex}"
        try:
            with open(source, "rb") as src:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(temp, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
            os.replace(temp, dest)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            if not source.is_file():
                raise NotFoundError(f"{self._where(key)} does not exist") from None
            raise StorageError(f"cannot download {self._where(key)} to {dest}: {e.strerror or e}") from e
        except OSError as e:
            raise StorageError(f"cannot download {self._where(key)} to {dest}: {e.strerror or e}") from e
        finally:
            temp.unlink(missing_ok=True)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, etag=_stat_token(st))

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        # Walk only the folders that can hold matching keys, then sort: keys compare like S3's (code point
        # order equals UTF-8 byte order), so both backends list in the same order.
        start_dir = prefix.rpartition("/")[0]
        if start_dir:
            validate_key(start_dir, self.uri)
        found: builtins.list[ObjectInfo] = []
        self._collect(self.root / start_dir if start_dir else self.root, start_dir, prefix, found)
        found.sort(key=lambda info: info.key)
        if start_after is not None:
            found = [info for info in found if info.key > start_after]
        return iter(found)

    def _collect(self, folder: Path, folder_key: str, prefix: str, out: builtins.list[ObjectInfo]) -> None:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StorageError(f"cannot list {self.uri}/{folder_key}: {e.strerror or e}") from e
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            key = f"{folder_key}/{entry.name}" if folder_key else entry.name
            if entry.is_dir(follow_symlinks=False):
                subtree = key + "/"
                if subtree.startswith(prefix) or prefix.startswith(subtree):
                    self._collect(Path(entry.path), key, prefix, out)
            elif key.startswith(prefix):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # deleted while listing
                    continue
                out.append(ObjectInfo(key=key, size=st.st_size, etag=_stat_token(st), modified=st.st_mtime))

    # -- other --------------------------------------------------------------------------------------------

    def copy(self, source: str, key: str) -> None:
        # A hard link: no bytes move and the source's file is never opened for writing (every put publishes a new
        # file by link or rename), so the earlier run's object stays as it was.
        source_path, final = self._path(source), self._path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.link(source_path, final)
            _fsync_dir(final.parent)
        except FileExistsError:
            raise AlreadyExistsError(f"{self._where(key)} already exists") from None
        except FileNotFoundError:
            raise NotFoundError(f"{self._where(source)} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot link {self._where(source)} to {self._where(key)}: {e.strerror or e}") from e

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self._where(key)}: {e.strerror or e}") from e

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def leftovers(self, prefix: str) -> builtins.list[str]:
        """Temporary and lock files under ``prefix`` (paths relative to the root), but for the locks held now."""
        start = self.root / prefix.rpartition("/")[0]
        found = []
        for path in sorted(start.rglob(f"{TEMP_PREFIX}*")) if start.is_dir() else ():
            name = path.relative_to(self.root).as_posix()
            if name.startswith(prefix) and path.is_file() and not _held(path):
                found.append(name)
        return found


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, creating it, and remove it on release.

    Removing a lock file is safe only because a waiter checks, once it holds the lock, that ``path`` still names
    the file it locked: a waiter woken on a removed file starts over instead of racing a writer who locked the
    new one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path, fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock, after the name is gone


def _names(path: Path, fd: int) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _held(path: Path) -> bool:
    """Whether a live process holds an ``flock`` on ``path`` (a lock in use, not a leftover)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _fsync_dir(folder: Path) -> None:
    """Persist the new directory entry, so a committed object survives a power loss."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stat_token(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _token(path: Path) -> str | None:
    try:
        return _stat_token(path.stat())
    except FileNotFoundError:
        return None
