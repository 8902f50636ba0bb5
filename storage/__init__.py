"""The Zarr sequence store, dataset readers, ingest and the synthetic drives.

Public entry points:
    - :class:`storage.store.SequenceStore`: open/create a store, read sequences lazily.
    - :func:`storage.ingest.ingest`: write a reader's sequences into a store, one at a time.
    - :data:`storage.readers.READERS`: dataset readers by layout name.
    - :mod:`storage.synthetic`: procedurally rendered drives with exact labels and flow.
"""
