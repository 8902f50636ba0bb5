"""Annotated frames of one or more stores as training samples (read lazily, one at a time).

Only manual annotations are ever returned (through :meth:`Sequence.annotation`), so training can
never see the evaluation-only ground truth of other frames.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from autolabel.errors import ClassSetMismatchError
from autolabel.storage.classes import ClassSet
from autolabel.storage.ids import select_ids
from autolabel.storage.store import Sequence, SequenceStore
from autolabel.wording import count


class AnnotatedFrames:
    """Indexable ``(rgb uint8 (H, W, 3), annotation uint8 (H, W))`` samples.

    Args:
        stores: opened stores; all must share one class set.
        sequences: restrict to these sequence ids (None = all sequences of every store).
    """

    def __init__(self, stores: Iterable[SequenceStore], sequences: Iterable[str] | None = None) -> None:
        self.stores = list(stores)
        if not self.stores:
            raise ClassSetMismatchError("no store given to read annotated frames from")
        self.classes: ClassSet = self.stores[0].classes
        for st in self.stores[1:]:
            if st.classes != self.classes:
                raise ClassSetMismatchError(
                    f"stores {self.stores[0].url!r} and {st.url!r} hold different class sets "
                    f"({self.classes.names} vs {st.classes.names}); train one teacher per class set"
                )
        patterns = list(sequences) if sequences is not None else None
        self._seqs: list[Sequence] = []
        self.index: list[tuple[int, int]] = []  # (position in _seqs, frame)
        every_id: list[str] = []
        for st in self.stores:
            every_id.extend(st.sequence_ids())
            for seq_id in select_ids(st.sequence_ids(), patterns, f"store {st.url!r}", must_match=False):
                seq = st.sequence(seq_id)
                self._seqs.append(seq)
                for t in np.flatnonzero(seq.annotated):
                    self.index.append((len(self._seqs) - 1, int(t)))
        select_ids(every_id, patterns, f"stores {[st.url for st in self.stores]}")  # a typo is an error

    @classmethod
    def from_sequence(cls, seq: Sequence) -> AnnotatedFrames:
        return cls([seq.store], [seq.id])  # ids hold no glob characters, so an id matches itself

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, t = self.index[i]
        seq = self._seqs[s]
        return seq.frame(t), seq.annotation(t)

    def __iter__(self):  # noqa: ANN204
        for i in range(len(self)):
            yield self[i]

    def describe(self) -> str:
        return (f"{count(len(self), 'annotated frame')} from {count(len(self._seqs), 'sequence')} in "
                f"{count(len(self.stores), 'store')}")
