"""``python -m batchgen.launch.k8s.fetch SRC_URI DEST_DIR``: copy model weights to node-local disk (the init container).

Files already present with the right size are skipped, so a restarted init container resumes instead of
downloading tens of gigabytes again. Each file is written atomically by the storage backend (on S3: boto3's transfer
manager, concurrent ranged GETs into a temporary file in the destination folder, renamed when whole); temporary files
a killed container left behind are removed first, as they would otherwise hold their share of the volume's size limit.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from batchgen.core.errors import EXIT_FAILURE, BatchgenError, StorageError
from batchgen.storage import open_storage
from batchgen.storage.local import TEMP_PREFIX

log = logging.getLogger("batchgen.k8s.fetch")


def fetch_tree(source_uri: str, dest: str | Path) -> tuple[int, int]:
    """Copy every object under ``source_uri`` into ``dest``; returns (files copied, files already present)."""
    storage = open_storage(source_uri)
    dest = Path(dest)
    remove_partial_downloads(dest)
    copied = present = 0
    for info in storage.list(""):
        target = dest / info.key
        if ".." in Path(info.key).parts or info.key.endswith("/"):
            continue
        if target.is_file() and target.stat().st_size == info.size:
            present += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(info.key, target)
        copied += 1
    if copied + present == 0:
        raise StorageError(f"{source_uri}: no model files found")
    return copied, present


def remove_partial_downloads(dest: Path) -> None:
    """The volume is this pod's own (an emptyDir): a temporary file in it is an earlier attempt's, never live."""
    stale = sorted(p for p in dest.rglob(f"{TEMP_PREFIX}*") if p.is_file()) if dest.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d partial download(s) an interrupted fetch left in %s", len(stale), dest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        log.error("usage: python -m batchgen.launch.k8s.fetch SRC_URI DEST_DIR")
        return 2
    try:
        copied, present = fetch_tree(argv[0], argv[1])
    except BatchgenError as e:
        log.error("%s", e)
        return e.exit_code
    except Exception:
        log.exception("model fetch failed")
        return EXIT_FAILURE
    log.info("model in %s: %d file(s) fetched, %d already present", argv[1], copied, present)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
