"""Review queue and keyframe suggestions from per-frame estimates (no ground truth)."""

from __future__ import annotations

import numpy as np

from autolabel.tasks.review import FrameErrors, ReviewConfig, review_queue, suggest_keyframes


def _window(errors: list[float], name: str = "s") -> FrameErrors:
    """A 21-frame window with its keyframe at 10 and K = 10."""
    distance = np.abs(np.arange(21) - 10)
    return FrameErrors(name, distance, np.asarray(errors, float), np.zeros(21), [f"f{t:02d}" for t in range(21)])


def _growing(side: str = "left", slope: float = 0.02, extra: float = 0.0) -> list[float]:
    d = np.abs(np.arange(21) - 10)
    e = slope * d
    if side == "left":
        e[:10] += extra * d[:10]
    else:
        e[11:] += extra * d[11:]
    return e.tolist()


class TestReviewQueue:
    def test_worst_first_with_disagreement(self) -> None:
        fe = _window(_growing())
        fe.disagreement[12] = 1.0
        queue = review_queue([fe], ReviewConfig(budget=3, disagreement_weight=0.5))
        assert [c.t for c in queue] == [12, 0, 20]
        assert all(c.distance > 0 for c in queue)  # keyframes are never proposed


class TestSuggest:
    def test_prefers_the_side_where_the_labels_are_worse(self) -> None:
        fe = _window(_growing("right", extra=0.03))
        picks = suggest_keyframes([fe], {"s": 10}, ReviewConfig(budget=1))
        assert len(picks) == 1 and picks[0].t > 10 and picks[0].score > 0

    def test_spreads_picks_and_respects_blocks(self) -> None:
        fe = _window(_growing())
        picks = suggest_keyframes([fe], {"s": 10}, ReviewConfig(budget=2))
        assert sorted(p.t < 10 for p in picks) == [False, True]  # one on each side
        two = [_window(_growing(), "a"), _window(_growing("left", extra=0.05), "b")]
        picks = suggest_keyframes(two, {"a": 10, "b": 10}, ReviewConfig(budget=2, per_block=21))
        assert sorted(p.sequence for p in picks) == ["a", "b"]  # one per 21-frame block

    def test_unreached_frames_attract_keyframes(self) -> None:
        distance = np.r_[np.full(10, -1), 0, np.arange(1, 11)]
        error = np.r_[np.ones(10), 0.0, np.full(10, 0.05)]
        fe = FrameErrors("s", distance, error, np.zeros(21), [str(t) for t in range(21)])
        picks = suggest_keyframes([fe], {"s": 10}, ReviewConfig(budget=1))
        assert picks[0].t < 10
