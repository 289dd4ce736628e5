"""Index folders on disk: atomic, resumable builds and incremental adds.

Layout of an index folder (the embeddings + metadata layout of clip-retrieval, which
autofaiss and vector databases ingest; metadata as JSON lines instead of parquet)::

    INDEX/
      manifest.json               what the index belongs to and how it is built (written last)
      image.index  text.index     FAISS indexes, ids = rows
      img_emb/img_emb_0000.npy .. float32 (n, dim) L2-normalised embeddings, one shard per build/add
      text_emb/text_emb_0000.npy ..
      metadata/image_0000.jsonl .. one JSON object per row: id, path, caption, label, source, digest
      metadata/text_0000.jsonl ..  id, caption, text, image_id, path, label, source, digest

A build embeds into a work folder beside the index (``.INDEX.work/``, one ``.npy`` per
chunk, each written atomically), then assembles the new index in a temporary folder and
swaps it in: an interrupted or failed build leaves the previous index as it was, and
re-running it reuses the chunks already embedded. A build, add or re-index killed at any
point leaves the previous index or the new one, complete; the next one of that folder
cleans up what the killed one left (:func:`recover`). See docs/indexes.md, "Crash safety".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

import radapter
from radapter.atomic import atomic_dir, atomic_path, crash_point, discard, folder_lock, recover_dir
from radapter.errors import first_line

from . import ann
from .collection import PARTS, Collection, collection_hash
from .embedder import Embedder
from .errors import IndexBuildError, IndexNotFoundError, IndexStoreError
from .keys import IndexKey, ModelKey, check_key

FORMAT = "radapter-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Shard numbers are zero-padded so that lexicographic order (how autofaiss and embedding readers
#: list a folder) is id order.
PART_FILES = {
    "image": {"index": "image.index", "emb": "img_emb/img_emb_{:04d}.npy", "meta": "metadata/image_{:04d}.jsonl"},
    "text": {"index": "text.index", "emb": "text_emb/text_emb_{:04d}.npy", "meta": "metadata/text_{:04d}.jsonl"},
}
DEFAULT_CHUNK = 4096
#: The steps a build or add reports to :func:`radapter.atomic.crash_point`, besides those of
#: :data:`radapter.atomic.STEPS`: a chunk of embeddings written, a part assembled, the new index swapped in
#: (its work folder not yet removed).
CRASH_STEPS = ("index.chunk", "index.part", "index.swapped")


@dataclass
class BuildResult:
    """What a build or add did."""

    path: Path
    status: str  # "built", "added", "up to date"
    manifest: dict[str, Any]
    embedded: dict[str, int] = field(default_factory=dict)  # items embedded in this run
    reused: dict[str, int] = field(default_factory=dict)  # items taken from an interrupted run
    seconds: float = 0.0


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index folder; :class:`IndexNotFoundError` if there is no complete index."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise IndexNotFoundError(f"no index at {path} (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise IndexStoreError(f"{file} is unreadable ({type(e).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise IndexStoreError(f"{file} is not a radapter index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexStoreError(f"{file} has format version {manifest.get('format_version')}; "
                              f"this radapter reads {FORMAT_VERSION}")
    return manifest


def manifest_key(manifest: dict[str, Any]) -> IndexKey:
    return IndexKey(ModelKey.from_json(manifest["key"]), manifest["collection"]["hash"])


def locked(path: Path, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
    """The exclusive lock of index folder ``path`` (``.NAME.lock`` beside it): across processes and
    threads, re-entrant within a thread (the lock :func:`~radapter.atomic.atomic_dir` takes).
    ``timeout``: seconds to wait before :class:`TimeoutError` (default: no limit)."""
    return folder_lock(path, timeout)


def work_dir(out: Path) -> Path:
    """The work folder of index folder ``out``: ``.NAME.work/`` beside it."""
    return out.with_name(f".{out.name}.work")


def recover(path: str | Path) -> list[str]:
    """Clean up what interrupted builds, adds or re-indexes of index folder ``path`` left, under its lock.

    Restores the previous index if a swap was cut between its two renames, deletes half-built
    temporary folders and stray partial chunk files; keeps the work folder's complete chunks
    (a re-run resumes from them). Returns what was done, one line each.
    """
    path = Path(path)
    with locked(path):
        done = recover_dir(path)
        work = work_dir(path)
        if work.is_dir():
            for stray in work.glob(".*.tmp"):  # a chunk file killed while being written
                stray.unlink(missing_ok=True)
                done.append(f"removed {work.name}/{stray.name}")
    return done


def drop_work(out: Path) -> None:
    """Delete the work folder of ``out`` (kept until the index it was for is swapped in)."""
    discard(work_dir(out), out)


# ----------------------------------------------------------------------------- embedding, resumable
def _prepare_work(out: Path, identity: dict[str, Any]) -> Path:
    """The work folder of ``out``: kept if it belongs to the same job, else started afresh."""
    work = work_dir(out)
    info = work / "work.json"
    if info.is_file():
        try:
            if json.loads(info.read_text()) == identity:
                return work
        except (OSError, json.JSONDecodeError):
            pass
    discard(work, out)
    work.mkdir(parents=True)
    with atomic_path(info) as tmp:
        tmp.write_text(json.dumps(identity, indent=1))
    return work


def _embed_chunks(embedder: Embedder, part: str, items: Sequence[Any], digests: Sequence[str], work: Path,
                  chunk: int, progress: bool) -> tuple[list[Path], int, int]:
    """Embed ``items`` chunk by chunk into ``work/{part}-{hash of the chunk's item digests}.npy``.

    Chunk files are named by their content, so a re-run reuses every chunk whose items did
    not change (even when a later item did). Returns the chunk files in order, the number of
    items embedded now and the number reused.
    """
    starts = range(0, len(items), chunk)
    files = [work / f"{part}-{hashlib.sha256(''.join(digests[s:s + chunk]).encode()).hexdigest()[:24]}.npy"
             for s in starts]
    done = [f.is_file() for f in files]
    initial = sum(min(chunk, len(items) - s) for s, d in zip(starts, done, strict=True) if d)
    embedded, done_items = 0, initial
    on_batch = getattr(embedder, "on_batch", None)
    with tqdm(total=len(items), initial=initial, desc=f"embedding {part}s", disable=not progress,
              unit=part) as bar:
        for s, file, d in zip(starts, files, done, strict=True):
            if d:
                continue
            n = min(chunk, len(items) - s)
            batched = (embedder.image_batches if part == "image" else embedder.text_batches)(items[s:s + n])
            batches = []
            for b in batched:
                batches.append(b)
                bar.update(len(b))
                done_items += len(b)
                if on_batch is not None:
                    on_batch(part, done_items, len(items))
            with atomic_path(file) as tmp, open(tmp, "wb") as f:
                np.save(f, np.concatenate(batches).astype(np.float32, copy=False))
            embedded += n
            crash_point("index.chunk")
    return files, embedded, initial


def _concat_chunks(files: Sequence[Path], dest: Path, dim: int) -> np.ndarray:
    """Join chunk files into one ``.npy`` at ``dest`` (written through a memory map); returns it mapped."""
    n = sum(np.load(f, mmap_mode="r").shape[0] for f in files)
    dest.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(dest, mode="w+", dtype=np.float32, shape=(n, dim))
    row = 0
    for f in files:
        x = np.load(f, mmap_mode="r")
        if x.shape[1] != dim:
            raise IndexBuildError(f"{f}: embedding width {x.shape[1]}, expected {dim}")
        out[row:row + len(x)] = x
        row += len(x)
    out.flush()
    del out
    return np.load(dest, mmap_mode="r")


def _write_rows(dest: Path, rows: Sequence[dict[str, Any]], first_id: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"id": first_id + i, **row}, ensure_ascii=False) + "\n")


def _embed_or_stop(embedder, work: Path, chunk_size: int, progress: bool, items, what: str, intact: str):
    """:func:`_embed_all`, turning any failure into one line that says what is intact and how to resume."""
    try:
        return _embed_all(embedder, work, chunk_size, progress, items)
    except IndexStoreError:
        raise
    except Exception as e:
        msg = first_line(e)
        raise IndexBuildError(f"{what} stopped: {msg} ({intact}; re-run to resume from the chunks kept in {work})") \
            from e


def _embed_all(embedder: Embedder, work: Path, chunk: int, progress: bool,
               items: dict[str, tuple[Sequence[Any], Sequence[str]]]
               ) -> tuple[dict[str, list[Path]], dict[str, int], dict[str, int]]:
    """Embed each part's ``(items, digests)`` into chunk files (see :func:`_embed_chunks`)."""
    files, embedded, reused = {}, {}, {}
    for part, (its, digests) in items.items():
        if len(its):
            files[part], embedded[part], reused[part] = _embed_chunks(embedder, part, its, digests, work, chunk,
                                                                      progress)
    return files, embedded, reused


def _dim(files: dict[str, list[Path]]) -> int:
    dims = {int(np.load(f[0], mmap_mode="r").shape[1]) for f in files.values() if f}
    if len(dims) != 1:
        raise IndexBuildError(f"image and text embeddings differ in width ({sorted(dims)})")
    return dims.pop()


def _versions() -> dict[str, str]:
    return {"radapter": radapter.__version__, "faiss": faiss.__version__, "numpy": np.__version__}


def _write_part_index(tmp: Path, part: str, index: faiss.Index) -> int:
    file = tmp / PART_FILES[part]["index"]
    faiss.write_index(index, str(file))
    return file.stat().st_size


# ----------------------------------------------------------------------------- build
def build_index(
    out: str | Path, embedder: Embedder, collection: Collection, *, index_type: str = "auto",
    index_params: dict[str, Any] | None = None, chunk_size: int = DEFAULT_CHUNK, force: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Embed ``collection`` with ``embedder`` and write an index folder at ``out``, atomically.

    Up to date (same model, adapter, alpha, collection and index type) and not ``force``:
    nothing is done. An interrupted build leaves the previous index intact; running it
    again resumes from the chunks already embedded (in ``.OUT.work/``).
    """
    out = Path(out)
    t0 = time.perf_counter()
    if not collection.parts:
        raise IndexBuildError(f"collection {collection.name!r} has nothing to index")
    key = IndexKey(embedder.key, collection.hash())
    with locked(out):
        recover(out)
        with contextlib.suppress(IndexStoreError):
            old = read_manifest(out)
            if not force and manifest_key(old) == key:
                if spec_matches(old, index_type, index_params):
                    drop_work(out)  # left by a run killed after its swap
                    return BuildResult(out, "up to date", old, seconds=time.perf_counter() - t0)
                manifest = _reindex(out, index_type, index_params)  # same embeddings, another index type
                drop_work(out)
                return BuildResult(out, "re-indexed", manifest, seconds=time.perf_counter() - t0)
        work = _prepare_work(out, {"key": key.model.to_json(), "chunk": chunk_size})
        items = {p: (collection.images if p == "image" else collection.texts, collection.digests(p))
                 for p in collection.parts}
        files, embedded, reused = _embed_or_stop(embedder, work, chunk_size, progress, items,
                                                 f"build of {out}", "the previous index is intact")
        dim = _dim(files)
        parts: dict[str, Any] = {}
        with atomic_dir(out) as tmp:
            for part, chunk_files in files.items():
                rel_emb, rel_meta = PART_FILES[part]["emb"].format(0), PART_FILES[part]["meta"].format(0)
                vectors = _concat_chunks(chunk_files, tmp / rel_emb, dim)
                rows = collection.image_rows if part == "image" else collection.text_rows
                _write_rows(tmp / rel_meta, [_row(part, r, collection, j) for j, r in enumerate(rows)], 0)
                spec = ann.choose_spec(len(vectors), dim, index_type, **(index_params or {}))
                index, trained_on = ann.build(vectors, spec)
                size = _write_part_index(tmp, part, index)
                crash_point("index.part")
                parts[part] = {
                    "count": int(index.ntotal),
                    "index": {**spec.to_json(), "trained_on": trained_on, "file": PART_FILES[part]["index"],
                              "bytes": size},
                    "shards": [{"embeddings": rel_emb, "metadata": rel_meta, "first_id": 0, "count": len(vectors)}],
                }
                del vectors
            manifest = _manifest(embedder, collection, key, dim, parts)
            manifest["history"] = [{"op": "build", "time": manifest["created"],
                                    "added": {p: v["count"] for p, v in parts.items()},
                                    "seconds": round(time.perf_counter() - t0, 3)}]
            _write_manifest(tmp, manifest)
        crash_point("index.swapped")
        drop_work(out)
    return BuildResult(out, "built", manifest, embedded, reused, time.perf_counter() - t0)


def spec_matches(manifest: dict[str, Any], index_type: str, params: dict[str, Any] | None) -> bool:
    """Whether every part's index is of ``index_type`` (``auto``: the type chosen for its size) and has
    the parameters given explicitly in ``params`` (derived defaults are not compared)."""
    for part in manifest["parts"].values():
        spec = part["index"]
        kind = ann.choose_spec(part["count"], manifest["dim"]).kind if index_type == "auto" else index_type
        if spec["type"] != kind:
            return False
        given = {k: v for k, v in (params or {}).items() if v is not None and k in ann.DEFAULTS.get(kind, {})}
        if any(spec["params"].get(k) != v for k, v in given.items()):
            return False
    return True


def _row(part: str, row: dict[str, Any], coll: Collection, j: int) -> dict[str, Any]:
    if part == "text":
        return {"caption": row.get("caption"), "text": coll.texts[j], "image_id": row.get("image_id"),
                "path": row.get("path"), "label": row.get("label"), "source": row.get("source"),
                "digest": row["digest"]}
    return {"path": row.get("path"), "caption": row.get("caption"), "label": row.get("label"),
            "source": row.get("source"), "digest": row["digest"]}


def _manifest(embedder: Embedder, coll: Collection, key: IndexKey, dim: int, parts: dict[str, Any]
              ) -> dict[str, Any]:
    created = now()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "key": key.model.to_json(),
        "model": embedder.describe(),
        "alpha": key.model.alpha,
        "dim": dim,
        "metric": "inner product of L2-normalised embeddings (cosine)",
        "count": {p: v["count"] for p, v in parts.items()},
        "parts": parts,
        "collection": {"hash": key.collection_hash, "name": coll.name, "caption_template": coll.caption_template,
                       "sources": coll.sources},
        "created": created, "updated": created,
        "versions": _versions(),
    }


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (last: its presence marks a complete index) and open the folder to readers
    (the temporary folder and file are created private)."""
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o644)
    folder.chmod(0o755)


def _link_tree(src: Path, dest: Path, skip: set[str]) -> None:
    """Hard-link (or copy) every file of ``src`` into ``dest``, except the relative paths in ``skip``.

    Shards are never rewritten in place, so sharing them between the old and new folder is safe.
    """
    for file in src.rglob("*"):
        rel = file.relative_to(src).as_posix()
        if not file.is_file() or rel in skip:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


class RowTable:
    """Metadata rows of a part read on demand: ``table[id]`` seeks to one line (thread-safe ``pread``).

    Line offsets (8 bytes per row) are found once by scanning the shards; the rows themselves
    stay on disk, so a hit list on a million-row index reads ten lines.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self.starts: list[np.ndarray] = []
        for f in self.files:
            data = np.fromfile(f, dtype=np.uint8)
            ends = np.flatnonzero(data == 10)
            self.starts.append(np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else
                               np.zeros(0, np.int64))
        self.offsets = np.cumsum([0] + [len(s) for s in self.starts])
        self.sizes = [f.stat().st_size for f in self.files]
        self._fds: list[int] | None = [os.open(f, os.O_RDONLY) for f in self.files]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range ({len(self)} rows)")
        if self._fds is None:
            raise IndexStoreError("the row table is closed")
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        start = int(self.starts[s][j])
        end = int(self.starts[s][j + 1]) if j + 1 < len(self.starts[s]) else self.sizes[s]
        return json.loads(os.pread(self._fds[s], end - start, start))

    def close(self) -> None:
        for fd in self._fds or []:
            os.close(fd)
        self._fds = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def row_table(path: str | Path, manifest: dict[str, Any], part: str) -> RowTable:
    return RowTable([Path(path) / s["metadata"] for s in manifest["parts"].get(part, {}).get("shards", [])])


def read_rows(path: str | Path, manifest: dict[str, Any], part: str) -> list[dict[str, Any]]:
    """All metadata rows of a part, in id order."""
    rows: list[dict[str, Any]] = []
    for shard in manifest["parts"].get(part, {}).get("shards", []):
        with open(Path(path) / shard["metadata"]) as f:
            rows += [json.loads(ln) for ln in f if ln.strip()]
    return rows


class ShardedRows:
    """Rows of several ``.npy`` shards as one read-only array: ``x[ids]``, ``x[a:b]``, ``np.asarray(x)``.

    Gathers only the rows asked for, so re-ranking reads a few rows of memory-mapped shards.
    """

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = list(arrays)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.shape = (int(self.offsets[-1]), int(self.arrays[0].shape[1]))
        self.dtype = self.arrays[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        if np.isscalar(idx):
            return self[np.array([idx])][0]
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.shape[1]), self.dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][idx[sel] - self.offsets[s]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self.arrays)
        return out if dtype is None else out.astype(dtype)


def read_embeddings(path: str | Path, manifest: dict[str, Any], part: str, mmap: bool = True
                    ) -> np.ndarray | ShardedRows:
    """All embeddings of a part, row = id: a memory map for one shard, :class:`ShardedRows` for several."""
    shards = manifest["parts"].get(part, {}).get("shards", [])
    arrays = [np.load(Path(path) / s["embeddings"], mmap_mode="r" if mmap else None) for s in shards]
    if not arrays:
        return np.zeros((0, manifest["dim"]), np.float32)
    return arrays[0] if len(arrays) == 1 else ShardedRows(arrays)


# ----------------------------------------------------------------------------- incremental add
def add_to_index(
    out: str | Path, embedder: Embedder, collection: Collection, *, index_type: str = "auto",
    index_params: dict[str, Any] | None = None, chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
) -> BuildResult:
    """Add the items of ``collection`` that ``out`` lacks (by digest), atomically.

    The embedder must be the index's model (same base, adapter and alpha). A new shard is
    written per part; the FAISS indexes get the new vectors appended (a trained IVF keeps
    its cells). Images whose file changed on disk since they were indexed are refused:
    rebuild to replace them. A part the index lacks gets a new index (``index_type``).
    """
    out = Path(out)
    t0 = time.perf_counter()
    with locked(out):
        recover(out)
        old = read_manifest(out)
        check_key(ModelKey.from_json(old["key"]), embedder.key, f"index {out}")
        old_rows = {p: read_rows(out, old, p) for p in PARTS}
        known = {p: {r["digest"]: r["id"] for r in old_rows[p]} for p in PARTS}
        _refuse_changed(old_rows["image"], collection, known["image"])
        digests = {p: collection.digests(p) for p in PARTS}
        new = {p: _new_positions(digests[p], known[p]) for p in PARTS}
        if not any(new.values()):
            drop_work(out)  # left by a run killed after its swap
            return BuildResult(out, "up to date", old, seconds=time.perf_counter() - t0)
        items = {p: (collection.subset(p, new[p])[0], [digests[p][j] for j in new[p]]) for p in PARTS if new[p]}
        work = _prepare_work(out, {"key": old["key"], "chunk": chunk_size})
        files, embedded, reused = _embed_or_stop(embedder, work, chunk_size, progress, items,
                                                 f"adding to {out}", "the index is intact")
        dim = _dim(files)
        if dim != old["dim"]:
            raise IndexBuildError(f"new embeddings are {dim}-d, the index is {old['dim']}-d")
        manifest = json.loads(json.dumps(old))
        image_ids = dict(known["image"])
        next_image = old["parts"].get("image", {}).get("count", 0)
        for pos, j in enumerate(new["image"]):
            image_ids[digests["image"][j]] = next_image + pos
        skip = {PART_FILES[p]["index"] for p in files} | {MANIFEST}
        with atomic_dir(out) as tmp:
            _link_tree(out, tmp, skip)
            for part, chunk_files in files.items():
                info = manifest["parts"].setdefault(part, {"count": 0, "shards": []})
                shard, first = len(info["shards"]), info["count"]
                rel_emb, rel_meta = PART_FILES[part]["emb"].format(shard), PART_FILES[part]["meta"].format(shard)
                vectors = _concat_chunks(chunk_files, tmp / rel_emb, dim)
                rows = [_row(part, r, collection, j) for j, r in zip(new[part], collection.subset(part, new[part])[1],
                                                                     strict=True)]
                if part == "text":  # re-point captions at their images' ids in this index
                    for row, j in zip(rows, new[part], strict=True):
                        i = collection.text_rows[j].get("image_id")
                        row["image_id"] = None if i is None else image_ids.get(digests["image"][i])
                _write_rows(tmp / rel_meta, rows, first)
                if "index" in info:
                    index = faiss.read_index(str(out / info["index"]["file"]))
                    ann.add(index, vectors)
                else:
                    spec = ann.choose_spec(len(vectors), dim, index_type, **(index_params or {}))
                    index, trained_on = ann.build(vectors, spec)
                    info["index"] = {**spec.to_json(), "trained_on": trained_on, "file": PART_FILES[part]["index"]}
                info["index"]["bytes"] = _write_part_index(tmp, part, index)
                crash_point("index.part")
                info["count"] = int(index.ntotal)
                info["shards"].append({"embeddings": rel_emb, "metadata": rel_meta, "first_id": first,
                                       "count": len(vectors)})
                del vectors
            all_digests = {p: [r["digest"] for r in old_rows[p]] + [digests[p][j] for j in new[p]] for p in PARTS}
            manifest["collection"]["hash"] = collection_hash(all_digests)
            manifest["collection"]["sources"] = old["collection"]["sources"] + collection.sources
            manifest["count"] = {p: v["count"] for p, v in manifest["parts"].items()}
            manifest["updated"] = now()
            manifest["versions"] = _versions()
            manifest["history"].append({"op": "add", "time": manifest["updated"],
                                        "added": {p: len(v) for p, v in new.items() if v},
                                        "seconds": round(time.perf_counter() - t0, 3)})
            _write_manifest(tmp, manifest)
        crash_point("index.swapped")
        drop_work(out)
    return BuildResult(out, "added", manifest, embedded, reused, time.perf_counter() - t0)


def _new_positions(digests: Sequence[str], known: dict[str, int]) -> list[int]:
    """Positions of the digests not in ``known`` (first occurrence of each)."""
    seen = set(known)
    out = []
    for j, d in enumerate(digests):
        if d not in seen:
            seen.add(d)
            out.append(j)
    return out


def _refuse_changed(rows: list[dict[str, Any]], coll: Collection, known: dict[str, int]) -> None:
    by_path = {r["path"]: r["digest"] for r in rows if r.get("path")}
    changed = [row["path"] for row, d in zip(coll.image_rows, coll.digests("image"), strict=True)
               if row.get("path") in by_path and d not in known and by_path[row["path"]] != d]
    if changed:
        raise IndexBuildError(f"{len(changed)} indexed image(s) changed on disk since they were indexed "
                              f"(e.g. {changed[0]}): rebuild the index instead of adding")


# ----------------------------------------------------------------------------- re-index
def reindex(out: str | Path, index_type: str = "auto", index_params: dict[str, Any] | None = None,
            parts: Sequence[str] | None = None) -> dict[str, Any]:
    """Rebuild the FAISS index of each part from the stored embeddings (no model needed), atomically."""
    out = Path(out)
    with locked(out):
        recover(out)
        return _reindex(out, index_type, index_params, parts)


def _reindex(out: Path, index_type: str, index_params: dict[str, Any] | None,
             parts: Sequence[str] | None = None) -> dict[str, Any]:
    manifest = read_manifest(out)
    parts = list(parts or manifest["parts"])
    skip = {PART_FILES[p]["index"] for p in parts} | {MANIFEST}
    with atomic_dir(out) as tmp:
        _link_tree(out, tmp, skip)
        for part in parts:
            vectors = read_embeddings(out, manifest, part)
            spec = ann.choose_spec(len(vectors), manifest["dim"], index_type, **(index_params or {}))
            index, trained_on = ann.build(vectors, spec)
            info = manifest["parts"][part]
            info["index"] = {**spec.to_json(), "trained_on": trained_on, "file": PART_FILES[part]["index"],
                             "bytes": _write_part_index(tmp, part, index)}
        manifest["updated"] = now()
        manifest["history"].append({"op": "reindex", "time": manifest["updated"], "type": index_type,
                                    "parts": parts})
        _write_manifest(tmp, manifest)
    return manifest
