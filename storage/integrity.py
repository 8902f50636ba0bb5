"""Integrity of stored data: missing chunks (found by listing) and corrupt ones (found by decoding).

Writers store every chunk (``WRITE_EVERY_CHUNK``), so a chunk key that is absent is always a
loss: Zarr would otherwise read it silently as the fill value (a black frame, a frame without
ground truth). :func:`missing_chunks` lists keys only and is cheap enough to run before a
sequence is labelled; :func:`corrupt_chunks` decodes everything and is what ``autolabel verify``
adds on top.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import zarr
from autolabel.storage.ids import select_ids
from autolabel.storage.leases import held_leases
from autolabel.storage.stages import INGEST
from autolabel.storage.store import Sequence, SequenceStore
from zarr.core.sync import sync

from autolabel.errors import AutolabelError, IntegrityError
from autolabel.progress import Progress, QuietProgress


def _stage_arrays(seq: Sequence) -> Iterator[tuple[str, zarr.Array]]:
    """``(path, array)`` of every array in the versions the stage records name (ingest included)."""
    seen = set()
    for record in seq.stages.values():
        at = record.get("at")
        if not at or at in seen:
            continue
        seen.add(at)
        try:
            group = seq.group[at]
        except KeyError:
            raise IntegrityError(f"sequence {seq.id!r}: version {at} named by a stage record is gone") from None
        for path, node in group.members(max_depth=None):
            if isinstance(node, zarr.Array):
                yield f"{at}/{path}", node


def _expected_keys(array: zarr.Array) -> set[str]:
    """Storage keys the array's chunk grid (or shard grid) has, relative to the array."""
    grid = array.shards or array.chunks
    counts = [-(-n // c) for n, c in zip(array.shape, grid)]
    return {"c/" + "/".join(map(str, idx)) for idx in itertools.product(*(range(n) for n in counts))}


def _present_keys(array: zarr.Array) -> set[str]:
    prefix = array.store_path.path

    async def keys() -> list[str]:
        return [k async for k in array.store_path.store.list_prefix(f"{prefix}/c/")]

    return {k[len(prefix) + 1:] for k in sync(keys())}


def missing_chunks(seq: Sequence, on_array: Callable[[], None] | None = None) -> dict[str, list[str]]:
    """Chunk (or shard) keys that each array of ``seq`` should have but does not, by array path;
    ``on_array`` after each array is listed."""
    missing = {}
    for path, array in _stage_arrays(seq):
        if array.size > 0:
            gone = _expected_keys(array) - _present_keys(array)
            if gone:
                missing[path] = sorted(gone)
        if on_array is not None:
            on_array()
    return missing


def _decode_steps(array: zarr.Array) -> int:
    """How many reads :func:`corrupt_chunks` makes of ``array``: one per shard (or chunk) along frames."""
    return -(-array.shape[0] // (array.shards or array.chunks)[0]) if array.ndim else 0


def corrupt_chunks(seq: Sequence, on_read: Callable[[], None] | None = None) -> dict[str, str]:
    """Arrays of ``seq`` that cannot be decoded, with the first error (reads every chunk); ``on_read``
    after each of the :func:`_decode_steps` reads of every array (also for those a damaged read cut short)."""
    corrupt = {}
    for path, array in _stage_arrays(seq):
        step = (array.shards or array.chunks)[0] if array.ndim else 1
        done = 0
        try:
            for start in range(0, array.shape[0] if array.ndim else 0, step):
                array[start:start + step]
                done += 1
                if on_read is not None:
                    on_read()
        except Exception as exc:  # noqa: BLE001 - any decoder error means a damaged chunk
            corrupt[path] = f"frames {start}..{start + step - 1}: {type(exc).__name__}: {exc}"
        if on_read is not None:
            for _ in range(_decode_steps(array) - done):
                on_read()
    return corrupt


REINGEST = "its frames or labels are damaged: ingest it again (`autolabel ingest ... --overwrite --sequence {id}`)"
RELABEL = "results of later stages are damaged: `autolabel verify --repair` drops them, the next `label` recomputes them"


def damaged_stages(seq: Sequence, paths: Iterable[str]) -> set[str]:
    """The stages whose versions hold the damaged array ``paths``."""
    at_stage = {r["at"]: name for name, r in seq.stages.items() if r.get("at")}
    return {stage for p in paths for at, stage in at_stage.items() if p == at or p.startswith(at + "/")}


def check_sequence(store: SequenceStore, seq_id: str) -> list[str]:
    """Before labelling: find missing chunks (listing only). Damaged ingest data raises IntegrityError;
    damaged later stages are dropped, so they are recomputed; returns the stages dropped."""
    seq = store.sequence(seq_id)
    missing = missing_chunks(seq)
    if not missing:
        return []
    stages = damaged_stages(seq, missing)
    where = "; ".join(f"{p}: {len(k)} missing ({', '.join(k[:3])}...)" for p, k in missing.items())
    if INGEST in stages:
        raise IntegrityError(f"sequence {seq_id!r} has missing chunks: {where}; " + REINGEST.format(id=seq_id))
    store.drop_stages(seq_id, sorted(stages))
    return sorted(stages)


@dataclass
class VerifyReport:
    """Every problem ``autolabel verify`` found, by sequence (``""`` for the store itself)."""

    store: str
    sequences: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, where: str, problem: str) -> None:
        self.problems.setdefault(where, []).append(problem)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(url: str, decode: bool = True, repair: bool = False,
                 progress: Progress | None = None, sequences: list[str] | None = None) -> VerifyReport:
    """Check every sequence of a store: metadata, version groups, chunks present and (``decode``) readable.

    ``repair`` drops the records of damaged stages other than ingest, so the next ``label``
    recomputes them (damaged frames need a new ingest). ``progress``: per sequence, one step per
    shard read (``decode``) or per array listed. ``sequences``: only these ids or globs (a bad or
    incomplete group is reported when its name matches); SelectionError where one matches nothing.
    """
    progress = progress or QuietProgress()
    store = SequenceStore.open(url, mode="r+" if repair else "r")
    report = VerifyReport(store=url)
    bad, incomplete, ids = store.bad_groups(), store.incomplete_ids(), store.sequence_ids()
    chosen = set(select_ids([*ids, *bad, *incomplete], sequences, f"store {url!r}"))
    for name, why in bad.items():
        if name in chosen:
            report.add(name, why)
    for seq_id in incomplete:
        if seq_id in chosen:
            report.notes.append(f"{seq_id}: incomplete (interrupted ingest; the next ingest rewrites it)")
    for seq_id in (i for i in ids if i in chosen):
        report.sequences += 1
        try:
            seq = store.sequence(seq_id)
            arrays = [array for _, array in _stage_arrays(seq)]
            progress.start(seq_id, "verify" if decode else "verify (chunks listed)",
                           sum(map(_decode_steps, arrays)) if decode else len(arrays))
            missing = missing_chunks(seq, None if decode else progress.advance)
            for path, keys in missing.items():
                report.add(seq_id, f"{path}: {len(keys)} missing chunks ({', '.join(keys[:3])}...)")
            corrupt = corrupt_chunks(seq, progress.advance) if decode else {}
            for path, why in corrupt.items():
                report.add(seq_id, f"{path}: corrupt ({why})")
            stages = damaged_stages(seq, [*missing, *corrupt])
        except AutolabelError as exc:
            report.add(seq_id, str(exc))
            continue
        if INGEST in stages:
            report.add(seq_id, "repair: " + REINGEST.format(id=seq_id))
        elif stages and repair:
            store.drop_stages(seq_id, sorted(stages))
            report.notes.append(f"{seq_id}: dropped {', '.join(sorted(stages))}; `autolabel label` recomputes them")
        elif stages:
            report.add(seq_id, "repair: " + RELABEL)
    for lease in held_leases(url):
        if sequences and lease.get("sequence") not in chosen:
            continue
        state = "stale (its run is gone; the next run takes it over)" if lease["stale"] else "held"
        report.notes.append(f"lease on {lease.get('sequence')}/{lease.get('stage')} by {lease.get('host')} "
                            f"pid {lease.get('pid')}: {state}")
    return report
