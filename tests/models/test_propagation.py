"""Propagation methods and recursion on in-memory inputs built from a synthetic drive."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from autolabel.models.propagation import (
    Candidate,
    LabelState,
    PropagationConfig,
    WarpInpaint,
    fuse,
    propagate,
    propagate_frames,
)
from autolabel.models.warping import inside_mask, warp_labels
from autolabel.storage.synthetic import SyntheticConfig

from autolabel.errors import ConfigError, RegistryError
from tests.conftest import DriveInputs

CFG = SyntheticConfig(width=96, height=72, frames=9, seed=2, ego_speed=(2.0, 3.0), fps=30.0)


def _acc(out, inputs: DriveInputs, t: int) -> float:  # noqa: ANN001
    return float((out[t].labels == inputs.frames[t].label).mean())


class TestRecursion:
    def test_distances_and_annotated_frames(self) -> None:
        inputs = DriveInputs(CFG, annotated=[4])
        out = propagate(inputs, PropagationConfig(method="motion-only", max_distance=3))
        assert [o.t for o in out] == list(range(9))
        assert [o.distance for o in out] == [-1, 3, 2, 1, 0, 1, 2, 3, -1]
        np.testing.assert_array_equal(out[4].labels, inputs.frames[4].label)
        assert (out[4].confidence == 255).all()
        assert (out[0].labels == 255).all() and (out[0].confidence == 0).all()

    def test_motion_only_confidence_halves_where_the_flow_check_fails(self) -> None:
        inputs = DriveInputs(SyntheticConfig(width=96, height=72, frames=9, seed=4), annotated=[4])  # 15 fps, fast
        out = propagate(inputs, PropagationConfig(method="motion-only", max_distance=3))
        values = set(np.unique(out[6].confidence).tolist())
        assert {255, 128} <= values, values  # 1.0 where consistent, halved where the check failed
        assert values <= {255, 128, 64}

    def test_chains_stop_at_the_next_annotation_and_fuse_between(self) -> None:
        inputs = DriveInputs(CFG, annotated=[1, 5])
        out = propagate(inputs, PropagationConfig(method="motion-only", max_distance=10))
        # frame 3 is 2 from both; frame 4 is 3 after frame 1 and 1 before frame 5
        assert [o.distance for o in out] == [1, 0, 1, 2, 1, 0, 1, 2, 3]

    def test_step_count_matches_the_recursion(self) -> None:
        from autolabel.models.propagation import count_steps

        annotated = np.zeros(30, bool)
        annotated[[10, 13]] = True
        steps: list[int] = []
        inputs = DriveInputs(CFG.model_copy(update={"frames": 30}), annotated=[10, 13])
        list(propagate_frames(inputs, PropagationConfig(method="motion-only", max_distance=4), on_step=lambda: steps.append(1)))
        # backward sweep: 9..6 from 10, 12..11 from 13; forward: 11..12 from 10, 14..17 from 13
        assert count_steps(annotated, 4) == len(steps) == 12

    def test_no_annotation(self) -> None:
        with pytest.raises(ConfigError, match="no annotated frame"):
            propagate(DriveInputs(CFG, annotated=[]), PropagationConfig(method="motion-only"))

    @pytest.mark.parametrize("k", [0, -2, 128, 1000])
    def test_k_must_fit_the_stored_distance(self, k: int) -> None:
        with pytest.raises(ConfigError, match=r"must be 1\.\.127 frames"):
            PropagationConfig(max_distance=k)

    def test_unknown_method(self) -> None:
        with pytest.raises(RegistryError, match="unknown propagation method 'magic'"):
            PropagationConfig(method="magic")


class TestMethods:
    def test_motion_only_with_exact_flow_is_near_exact_at_distance_one(self) -> None:
        inputs = DriveInputs(CFG, annotated=[4])
        out = propagate(inputs, PropagationConfig(method="motion-only", max_distance=4))
        assert _acc(out, inputs, 3) > 0.97 and _acc(out, inputs, 5) > 0.97

    def test_semantic_only_thresholds_teacher_confidence(self) -> None:
        confident = propagate(DriveInputs(CFG, [4], teacher_conf=0.95), PropagationConfig(method="semantic-only"))
        np.testing.assert_array_equal(confident[6].labels, DriveInputs(CFG, [4]).frames[6].label)
        assert (confident[6].confidence == round(0.95 * 255)).all()
        unsure = propagate(DriveInputs(CFG, [4], teacher_conf=0.9), PropagationConfig(method="semantic-only"))
        assert (unsure[6].labels == 255).all()  # confidence must exceed 0.9

    def test_warp_inpaint_is_warp_where_trusted_and_teacher_elsewhere(self) -> None:
        noisy = DriveInputs(CFG, [4], teacher_conf=0.6, teacher_noise=1.0)  # teacher always wrong
        eq5 = PropagationConfig(method="warp-inpaint", tau=20.0, inpaint_confidence=0.0, override_confidence=1.0)
        method = WarpInpaint(eq5)
        ann = torch.from_numpy(noisy.annotation(4)).long()
        step = method.step(LabelState(ann, torch.ones(ann.shape)), 4, 5, noisy)
        trusted, to_src = method.trust_mask(4, 5, noisy)
        warped = warp_labels(ann[None], to_src)[0]
        expected = torch.where(trusted, warped, torch.from_numpy(noisy.teacher(5)[0]).long())
        assert torch.equal(step.labels, expected)
        assert 0.05 < trusted.float().mean() < 0.99  # both sources are used
        torch.testing.assert_close(step.confidence[~trusted], torch.full_like(step.confidence[~trusted], 0.6))

    @pytest.mark.parametrize(("teacher_conf", "teacher_everywhere"), [(0.6, False), (0.99, True)])
    def test_guards_gate_the_teacher_by_its_confidence(self, teacher_conf: float, teacher_everywhere: bool) -> None:
        noisy = DriveInputs(CFG, [4], teacher_conf=teacher_conf, teacher_noise=1.0)
        method = WarpInpaint(PropagationConfig(method="warp-inpaint", tau=20.0))  # guards 0.9 / 0.98
        ann = torch.from_numpy(noisy.annotation(4)).long()
        step = method.step(LabelState(ann, torch.ones(ann.shape)), 4, 5, noisy)
        _, to_src = method.trust_mask(4, 5, noisy)
        if teacher_everywhere:  # at or above the override level even trusted warps give way
            assert torch.equal(step.labels, torch.from_numpy(noisy.teacher(5)[0]).long())
        else:  # too unsure to inpaint: the (border-filled) warp stays everywhere
            assert torch.equal(step.labels, warp_labels(ann[None], to_src, outside="border")[0])

    def test_trust_mask_follows_tau_and_the_frame_border(self) -> None:
        inputs = DriveInputs(CFG, [4])
        strict = WarpInpaint(PropagationConfig(tau=1e-6)).trust_mask(4, 5, inputs)[0]
        loose, to_src = WarpInpaint(PropagationConfig(tau=1e6, fb_check=False)).trust_mask(4, 5, inputs)
        assert strict.float().mean() < loose.float().mean()
        assert torch.equal(loose, inside_mask(to_src)[0])

    def test_warp_inpaint_beats_motion_only_with_a_good_teacher(self) -> None:
        cfg = SyntheticConfig(width=96, height=72, frames=13, seed=4)  # fast drive: motion drifts
        inputs = DriveInputs(cfg, [0], teacher_conf=0.95)  # confident enough to inpaint, not to override
        motion = propagate(inputs, PropagationConfig(method="motion-only", max_distance=12))
        inpaint = propagate(inputs, PropagationConfig(method="warp-inpaint", max_distance=12))
        assert _acc(inpaint, inputs, 12) > _acc(motion, inputs, 12) + 0.02


class TestFusion:
    def _cand(self, label: int, conf: list[float], distance: int) -> Candidate:
        return Candidate(np.full(len(conf), label, np.uint8), np.asarray(conf, np.float32), distance)

    def test_higher_confidence_wins_per_pixel(self) -> None:
        fused = fuse(self._cand(1, [0.9, 0.2], 3), self._cand(2, [0.5, 0.6], 5))
        assert fused.labels.tolist() == [1, 2] and fused.distance == 3

    def test_ties_go_to_the_nearer_keyframe(self) -> None:
        assert fuse(self._cand(1, [0.5], 4), self._cand(2, [0.5], 2)).labels.tolist() == [2]
        assert fuse(self._cand(1, [0.5], 2), self._cand(2, [0.5], 4)).labels.tolist() == [1]
        assert fuse(self._cand(1, [0.5], 3), self._cand(2, [0.5], 3)).labels.tolist() == [1]

    def test_one_side_only(self) -> None:
        only = self._cand(1, [0.5], 2)
        assert fuse(only, None) is only and fuse(None, only) is only and fuse(None, None) is None
