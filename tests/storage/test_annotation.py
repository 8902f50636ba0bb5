"""Which labelled frames become annotations: all, window centres, every N-th."""

from __future__ import annotations

import numpy as np
import pytest

from autolabel.errors import ConfigError
from autolabel.storage.annotation import AnnotationPolicy


def _annotated(policy: AnnotationPolicy, frames: int, labelled: list[int] | None = None) -> list[int]:
    mask = np.zeros(frames, bool)
    mask[labelled if labelled is not None else slice(None)] = True
    return np.flatnonzero(policy.select(mask)).tolist()


class TestWindow:
    @pytest.mark.parametrize(("frames", "centres"), [
        (42, [10, 31]),            # CamVid dense: 0016E5_07979 and 0016E5_08021
        (50, [10, 31]),            # trailing 8 frames fill no window
        (104, [10, 31, 52, 73]),
        (21, [10]),
        (15, [7]),                 # shorter than one window: its own centre
        (1, [0]),                  # a single keyframe stays annotated
    ])
    def test_centres_of_full_windows(self, frames: int, centres: list[int]) -> None:
        assert _annotated(AnnotationPolicy(mode="window", n=21), frames) == centres

    def test_unlabelled_centre_is_not_annotated(self) -> None:
        assert _annotated(AnnotationPolicy(mode="window", n=5), 10, labelled=[2, 3, 4]) == [2]

    @pytest.mark.parametrize("n", [2, 20, 1])
    def test_window_must_be_odd_and_at_least_three(self, n: int) -> None:
        with pytest.raises(ConfigError, match="odd size"):
            AnnotationPolicy(mode="window", n=n)


class TestOtherPolicies:
    def test_all_labelled_frames(self) -> None:
        assert _annotated(AnnotationPolicy(), 6, labelled=[1, 4]) == [1, 4]

    def test_keyframe_every(self) -> None:
        assert _annotated(AnnotationPolicy(mode="keyframe-every", n=4), 10) == [0, 4, 8]

    def test_options_are_exclusive(self) -> None:
        with pytest.raises(ConfigError, match="either --window or --keyframe-every"):
            AnnotationPolicy.from_options(window=21, keyframe_every=5)

    def test_from_options(self) -> None:
        assert AnnotationPolicy.from_options(window=21) == AnnotationPolicy(mode="window", n=21)
        assert AnnotationPolicy.from_options() == AnnotationPolicy()
