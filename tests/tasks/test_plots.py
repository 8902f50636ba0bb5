"""The evaluation figures (``autolabel evaluate --plot`` and the dashboard's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.tasks.evaluate import evaluate_store
from autolabel.tasks.plots import plot_report
from PIL import Image


@pytest.fixture
def store(tmp_path: Path) -> SequenceStore:
    url = str(tmp_path / "s.zarr")
    write_synthetic_store(url, drive_configs(1, SyntheticConfig(width=48, height=32, frames=3, seed=0)))
    return SequenceStore.open(url)


class TestPlotReport:
    def test_a_report_with_nothing_scored_still_draws_both_figures(self, store: SequenceStore,
                                                                  tmp_path: Path) -> None:
        """Every drive of a dashboard run failed: the figure used to end the flow with matplotlib's
        'No artists with labels found to put in legend' (an error under strict warnings)."""
        report = evaluate_store(store, ["motion-only"], 5, sequences=[])
        paths = plot_report(report, tmp_path / "plots")
        assert [p.name for p in paths] == ["miou_by_distance.png", "per_class_iou.png"]
        for path in paths:
            pixels = np.asarray(Image.open(path).convert("L"))
            assert pixels.shape[0] > 300 and pixels.std() > 0  # a drawn figure, not a blank file
