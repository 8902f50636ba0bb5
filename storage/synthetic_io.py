"""Writing synthetic drives: into a store (with their exact flow) or as an ApolloScape folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from autolabel.atomic import atomic_path
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.classes import APOLLO_LABELS
from autolabel.storage.images import write_png_atomic
from autolabel.storage.ingest import IngestReport, SequenceOutcome
from autolabel.storage.stages import flow_array_names, flow_stage
from autolabel.storage.store import SequenceStore, StoreLayout

from autolabel.errors import ClassSetMismatchError
from autolabel.storage.synthetic import FrameRenderer, SyntheticConfig, render_workers
from PIL import Image

EXACT_FLOW = "exact"

# synthetic (CamVid) class -> ApolloScape class id of the official label list
APOLLO_ID_OF: dict[str, int] = {
    "Sky": 17, "Building": 97, "Pole": 82, "Road": 49, "Pavement": 50, "Tree": 113,
    "SignSymbol": 83, "Fence": 67, "Car": 33, "Pedestrian": 36, "Bicyclist": 35,
}
assert set(APOLLO_ID_OF.values()) <= {i for _, i, _, _ in APOLLO_LABELS}


def synthetic_sequence_id(config: SyntheticConfig) -> str:
    return f"synth-{config.seed:04d}"


def write_drive(
    store: SequenceStore,
    config: SyntheticConfig,
    annotation: AnnotationPolicy,
    *,
    seq_id: str | None = None,
    layout: StoreLayout | None = None,
    on_frame: Callable[[], None] | None = None,
    renderer: FrameRenderer | None = None,
) -> SequenceOutcome:
    """Render one drive into ``store`` with frames, labels and exact flow (stage ``flow/exact``).

    Every frame has ground truth; ``annotation`` decides which frames are annotations. A drive
    rendered with a subset of the store's classes has its labels mapped to the store's class ids
    by name; a class the store lacks is an error. ``renderer``: the processes to render in (default:
    this one).
    """
    names = store.classes.names
    missing = [c for c in config.classes if c not in names]
    if missing:
        raise ClassSetMismatchError(f"synthetic drive seed={config.seed} has classes {missing} that store "
                                    f"{store.url!r} lacks (store classes: {', '.join(names)})")
    to_store = np.full(256, store.classes.ignore_index, np.uint8)
    to_store[: len(config.classes)] = [names.index(c) for c in config.classes]
    seq_id = seq_id or synthetic_sequence_id(config)
    h, w, t_total = config.height, config.width, config.frames
    with store.new_sequence(seq_id, expected_frames=t_total, source=f"synthetic seed={config.seed}",
                            fps=config.fps, layout=layout) as writer:
        fw_name, bw_name = flow_array_names(EXACT_FLOW)
        pairs = max(t_total - 1, 1)
        fw = writer.extra_array(fw_name, (2, h, w), "float16", pairs, ("T", "XY", "H", "W"))
        bw = writer.extra_array(bw_name, (2, h, w), "float16", pairs, ("T", "XY", "H", "W"))
        for t, frame in enumerate((renderer or FrameRenderer()).frames(config)):
            writer.write(f"{t:06d}", frame.rgb, to_store[frame.label], origin=f"{seq_id} frame {t}")
            if t + 1 < t_total:
                fw.append(frame.flow_next.astype(np.float16))
            if t > 0:
                bw.append(frame.flow_prev.astype(np.float16))
            if on_frame is not None:
                on_frame()
        fw.close()
        bw.close()
        exact = {flow_stage(EXACT_FLOW): {"backend": EXACT_FLOW, "pairs": t_total - 1}} if t_total > 1 else {}
        seq = writer.finish(annotation.select(np.ones(t_total, dtype=bool)), stages=exact)
    return SequenceOutcome(id=seq_id, status="ingested", frames=seq.num_frames,
                           annotated=int(seq.annotated.sum()), ground_truth=seq.num_frames)


def write_synthetic_store(
    url: str,
    configs: list[SyntheticConfig],
    annotation: AnnotationPolicy | None = None,
    *,
    layout: StoreLayout | None = None,
    overwrite: bool = False,
    on_frame: Callable[[], None] | None = None,
    workers: int | None = None,
) -> IngestReport:
    """Render ``configs`` into the store at ``url`` (created with the first one's class set, which
    must hold every other drive's classes), in ``workers`` processes (default: :func:`render_workers`)."""
    annotation = annotation or AnnotationPolicy(mode="keyframe-every", n=10)
    if not configs:
        return IngestReport(store=url)
    store = SequenceStore.create(url, configs[0].class_set())
    report = IngestReport(store=url)
    done = set(store.sequence_ids())
    todo = [cfg for cfg in configs if overwrite or synthetic_sequence_id(cfg) not in done]
    with FrameRenderer(render_workers(todo) if workers is None else workers) as renderer:
        for cfg in configs:
            if cfg not in todo:
                report.outcomes.append(SequenceOutcome(id=synthetic_sequence_id(cfg), status="skipped"))
                continue
            report.outcomes.append(write_drive(store, cfg, annotation, layout=layout, on_frame=on_frame,
                                               renderer=renderer))
    return report


def write_apollo_layout(
    out: Path, configs: list[SyntheticConfig], *, jpeg_quality: int = 95,
    on_frame: Callable[[], None] | None = None, workers: int | None = None,
) -> list[Path]:
    """Write drives as ApolloScape scene-parsing folders (``road<NN>/ColorImage/Record001/Camera 5``).

    Drive ``i`` (seed s) becomes road ``road<s+1:02d>``; labels are ``*_bin.png`` with ApolloScape
    class ids, time stamps advance at the drive's frame rate. Rendered in ``workers`` processes
    (default: :func:`render_workers`). Returns the camera folders written.
    """
    with FrameRenderer(render_workers(configs) if workers is None else workers) as renderer:
        return [_write_apollo_drive(out, cfg, jpeg_quality, on_frame, renderer) for cfg in configs]


def _write_apollo_drive(out: Path, cfg: SyntheticConfig, jpeg_quality: int, on_frame: Callable[[], None] | None,
                        renderer: FrameRenderer) -> Path:
    """One drive of :func:`write_apollo_layout`; returns its camera folder."""
    ids = np.array([APOLLO_ID_OF[c] for c in cfg.classes] + [0] * (256 - len(cfg.classes)), dtype=np.uint8)
    road = out / f"road{cfg.seed + 1:02d}"
    image_dir = road / "ColorImage" / "Record001" / "Camera 5"
    label_dir = road / "Label" / "Record001" / "Camera 5"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(renderer.frames(cfg)):
        ms = int(round(t * 1000 / cfg.fps))
        stamp = f"170908_{(8 + ms // 3_600_000) % 24:02d}{(ms // 60_000) % 60:02d}{(ms // 1000) % 60:02d}{ms % 1000:03d}"
        stem = f"{stamp}_Camera_5"
        with atomic_path(image_dir / f"{stem}.jpg") as tmp:
            Image.fromarray(frame.rgb).save(tmp, format="JPEG", quality=jpeg_quality)
        write_png_atomic(label_dir / f"{stem}_bin.png", ids[frame.label])
        if on_frame is not None:
            on_frame()
    return image_dir
