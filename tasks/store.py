"""The store: stage outputs addressed by cache key, written atomically, loaded only when their hash matches.

Layout under the store root (default data/runs):
    stages/<NN_stage>/<key>/<stage>.joblib   the stage's output as data (ingest: ingest.npy), plus readable CSV/JSON/PNG
    stages/<NN_stage>/<key>/meta.json        every file of the stage with its sha256
    <run_id>/manifest.json                   one run: inputs, parameters, versions, stage files and hashes
    .records/                                Prefect's cache records (which key produced which stage ref)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from tasks.durable import Written, beside, fsync_dir, sha256_file, stat_fingerprint, synced_sha256, write_json
from tasks.errors import StoreError

STAGES = ("ingest", "normalize", "split", "train", "validate", "infer", "report")
RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")


FLEET_STAGES = ("fleet-ingest", "fleet-train", "fleet-validate", "fleet-infer", "fleet-report")


def stage_folder(stage: str) -> str:
    """'train' -> '04_train', 'fleet-train' -> 'fleet/02_train': stage folders are numbered in
    pipeline order, as Kedro numbers its layers; a fleet's stages have a folder of their own."""
    if stage in FLEET_STAGES:
        return f"fleet/{FLEET_STAGES.index(stage) + 1:02d}_{stage.removeprefix('fleet-')}"
    return f"{STAGES.index(stage) + 1:02d}_{stage}"


LARGE_LOAD = 32 << 20  # bytes; loading a file at least this large first hands freed heap back


@functools.cache
def _libc():
    """glibc, or None on another C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HEAP_LIMIT = 4 << 20  # bytes


@functools.cache
def limit_heap_retention() -> None:
    """Have glibc give every block of HEAP_LIMIT or more its own mapping, returned to the system
    when freed (once per process; elsewhere nothing).

    By default glibc raises that threshold to the largest block freed so far, up to 32 MiB: after
    the first large numpy or torch array is freed, arrays up to 32 MiB come from the heap, and
    what the stages free stays resident while the next stage allocates its own. On 10 million
    readings that took a run's peak from about 780 MB to 1.1-1.4 GB. The cost: a large temporary
    made every epoch is mapped anew each time (page faults, a few per cent of such an epoch).
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT)


@contextlib.contextmanager
def spare_the_collector():
    """For the block: every object alive when it starts (the imported modules, Prefect's state)
    is out of the cyclic garbage collector's sight (gc.freeze), and back in it afterwards.

    A loop that makes a few tensors an epoch triggers a full collection every few hundred epochs,
    and a full collection scans every object of the process: with torch, pandas and Prefect
    imported, about 270,000, some 100 ms each time. In a real run that doubled the seed's
    5000-epoch finite-difference training. Frozen objects are still freed by reference counting,
    and unfrozen at the end, so cycles among them are collected later as before (a long-lived
    process, `thermocal serve`, does not keep them for good). A run forked from the warm process
    (flows.warm, which sets THERMOCAL_FORKED_FROM) unfreezes nothing: the warm process froze its
    objects so that forks share them, and a full collection over them would write to every one and
    copy the whole heap into the fork. (gc.get_freeze_count, which could tell, walks every frozen
    object: 40 ms there.)
    """
    import gc

    gc.freeze()
    try:
        yield
    finally:
        if "THERMOCAL_FORKED_FROM" not in os.environ:
            gc.unfreeze()


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc; elsewhere nothing).

    numpy and torch allocate arrays under 32 MiB on the heap, and glibc keeps what they free
    resident. One stage's freed temporaries (train's, about 400 MB on 10 million rows) then stay
    in the process's resident size while the next stage allocates its own, and the peaks add up.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class Store:
    """A store root; every path it hands out stays below that root."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    @property
    def records(self) -> Path:
        return self.root / ".records"

    def stage_dir(self, stage: str, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):
            raise StoreError(f"malformed stage key {key!r}")
        return self.root / "stages" / stage_folder(stage) / key

    def sweep_dir(self, sweep_id: str) -> Path:
        if not RUN_ID.match(sweep_id):
            raise StoreError(f"malformed sweep id {sweep_id!r}")
        return self.root / "sweeps" / sweep_id

    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID.match(run_id):
            raise StoreError(f"malformed run id {run_id!r}; run ids look like 20261130-062553-1a2b3c4d")
        return self.root / run_id

    # -- stages -------------------------------------------------------------------------------

    def write_stage(self, stage: str, key: str, files: dict[str, Callable[[Path], Any]], summary: dict | None = None) -> dict:
        """Write a stage's files (name -> writer; the first is the stage's main file) into a fresh
        folder and rename it into place as a whole. Returns the stage ref: the data a downstream
        stage needs to find and verify this output."""
        with self.stage_folder(stage, key) as folder:
            for name, write in files.items():
                folder.write(name, write)
            return folder.install(summary)

    @contextlib.contextmanager
    def stage_folder(self, stage: str, key: str):
        """A StageFolder for the block. If the block ends before it is installed, it is removed, and
        so are the folders made for it that are left empty: a file that fails its checks leaves the
        store as it was."""
        folder = StageFolder(self, stage, key)
        try:
            yield folder
        finally:
            if folder.tmp.exists():
                shutil.rmtree(folder.tmp, ignore_errors=True)
                for made in folder.made:  # the deepest first; one another run has filled stays
                    with contextlib.suppress(OSError):
                        made.rmdir()

    def _install(self, tmp: Path, final: Path) -> None:
        try:
            os.rename(tmp, final)
        except OSError:
            # the folder exists: another run wrote it first, or it is damaged
            if self.intact(final):
                return
            trash = final.parent / f".trash-{uuid.uuid4().hex}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(final.parent)

    def intact(self, folder: Path) -> bool:
        """True when the folder's meta.json exists and every file it lists has its recorded content.

        A file whose size and modification time are still those recorded is taken as unchanged
        without reading it (hashing a 10-million-row stage costs a second); any other is hashed.
        Loading always verifies the hash, so nothing unverified is ever unpickled.
        """
        try:
            meta = json.loads((folder / "meta.json").read_text())
            stats = meta.get("stat", {})
            return all(
                stat_fingerprint(folder / name) == stats.get(name) or sha256_file(folder / name) == digest
                for name, digest in meta["files"].items()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def stage_intact(self, stage: str, key: str) -> bool:
        return self.intact(self.stage_dir(stage, key))

    def stage_ref(self, stage: str, key: str) -> dict:
        folder = self.stage_dir(stage, key)
        meta = json.loads((folder / "meta.json").read_text())
        main = meta["main"]
        return {
            "stage": stage,
            "key": key,
            "path": str((folder / main).relative_to(self.root)),
            "sha256": meta["files"][main],
            "files": {name: str((folder / name).relative_to(self.root)) for name in meta["files"]},
            "summary": meta["summary"],
        }

    def file_ref(self, ref: dict, name: str) -> dict:
        """A ref to another file of a stage (`name`, one of ref["files"]), with the hash its
        meta.json recorded: `load` verifies it as it verifies a stage's main file."""
        folder = self.path(ref["path"]).parent
        try:
            digest = json.loads((folder / "meta.json").read_text())["files"][name]
        except (OSError, ValueError, KeyError):
            raise StoreError(f"{folder / name}: missing from its stage; run the pipeline again to recompute the {ref['stage']} stage") from None
        return {"stage": ref["stage"], "path": ref["files"][name], "sha256": digest}

    def path(self, relative: str) -> Path:
        """An absolute path for a store-relative one, refusing anything outside the store."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise StoreError(f"{relative!r} points outside the store {self.root}")
        return path

    def load(self, ref: dict) -> Any:
        """Load the stage's main file (np.load a .npy, joblib.load any other), only if it still has
        the hash recorded when it was written."""
        path = self.path(ref["path"])
        try:
            actual = sha256_file(path)
        except OSError:
            raise StoreError(f"{path}: missing; run the pipeline again to recompute the {ref['stage']} stage") from None
        if actual != ref["sha256"]:
            raise StoreError(
                f"{path}: content hash {actual[:12]}… differs from the recorded {ref['sha256'][:12]}…; "
                "the file was modified or corrupted, so it was not loaded; `thermocal run` with the run's "
                "options recomputes it"
            )
        if path.stat().st_size >= LARGE_LOAD:
            release_free_heap()  # what earlier stages freed, before this file adds its own
        if path.suffix == ".npy":
            import numpy as np  # here: `thermocal runs` and a cached run never load a stage, nor numpy

            return np.load(path, allow_pickle=False)
        import joblib

        return joblib.load(path)

    @contextlib.contextmanager
    def tidy_on_failure(self):
        """If the store did not exist and the block fails, remove the empty folders it left behind."""
        existed = self.root.exists()
        try:
            yield self
        except BaseException:
            if not existed:
                self.remove_empty_folders()
            raise

    def remove_empty_folders(self) -> None:
        """Remove folders of the store that hold no file (never a file), deepest first."""
        if not self.root.is_dir():
            return
        for folder in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        if not any(self.root.iterdir()):
            self.root.rmdir()

    # -- runs ---------------------------------------------------------------------------------

    def write_manifest(self, run_id: str, manifest: dict) -> Path:
        path = self.run_dir(run_id) / "manifest.json"
        write_json(path, manifest)
        return path

    def manifests(self) -> list[dict]:
        """Every readable run manifest, oldest first."""
        found = []
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            if RUN_ID.match(folder.name) and (folder / "manifest.json").is_file():
                try:
                    found.append(json.loads((folder / "manifest.json").read_text()))
                except (OSError, ValueError):
                    continue
        return sorted(found, key=lambda m: (m.get("created", ""), m.get("run_id", "")))

    def manifest(self, run_id: str | None = None) -> dict:
        """The manifest of `run_id`, or of the latest run."""
        if run_id is None:
            runs = self.manifests()
            if not runs:
                raise StoreError(f"no runs in {self.root}; run `thermocal run` first")
            return runs[-1]
        path = self.run_dir(run_id) / "manifest.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"no run {run_id!r} in {self.root}; `thermocal runs` lists them") from None


class StageFolder:
    """A stage's output while it is written: files go into a fresh hidden folder beside the final
    one, and `install` renames it into place as a whole, with meta.json listing every file's hash,
    size and modification time. Store.stage_folder removes it if the block ends uninstalled."""

    def __init__(self, store: Store, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key
        self.final = store.stage_dir(stage, key)
        self.made = [p for p in (self.final.parent, *self.final.parent.parents) if p.is_relative_to(store.root) and not p.exists()]
        self.tmp = self.final.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex}"
        for attempt in range(3):
            try:
                self.tmp.mkdir(parents=True)  # with the stage's folder, unless it exists
                break
            except FileNotFoundError:  # another run's failure removed that folder as this one made it
                if attempt == 2:
                    raise
        self.hashes: dict[str, str] = {}
        self.stats: dict[str, list[int]] = {}

    def write(self, name: str, writer: Callable[[Path], Any], beside_it: Callable[[], Any] | None = None) -> Any:
        """Write one file (the first written is the stage's main file) and record its hash. With
        `beside_it`, the file is written in a thread while beside_it() runs here; its result is
        returned; if it raises, the file is still finished first, and the stage is left uninstalled."""
        path = self.tmp / name

        def write() -> None:
            written = writer(path)
            self.hashes[name] = written if isinstance(written, Written) else synced_sha256(path)
            self.stats[name] = stat_fingerprint(path)  # a rename keeps size and mtime

        if beside_it is None:
            return write()
        return beside(write, beside_it)

    def install(self, summary: dict | None = None) -> dict:
        """Write meta.json and rename the folder into place; returns the stage ref."""
        meta = {"stage": self.stage, "key": self.key, "main": next(iter(self.hashes)), "files": self.hashes, "stat": self.stats,
                "summary": summary or {}}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        fsync_dir(self.tmp)
        self.store._install(self.tmp, self.final)
        return self.store.stage_ref(self.stage, self.key)
