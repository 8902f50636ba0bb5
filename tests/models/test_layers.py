"""FoldingSequential: batch norm folded into the convolution before it, in eval mode only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autolabel.models.layers import _FOLDS, FoldingSequential, conv_bn_relu
from autolabel.models.refiner import Refiner, RefinerInput
from autolabel.models.teacher import Teacher


def _trained_block(cin: int = 5, cout: int = 7, **kwargs: int) -> FoldingSequential:
    """A conv_bn_relu whose batch norm has non-trivial weights and running statistics."""
    torch.manual_seed(0)
    block = conv_bn_relu(cin, cout, **kwargs)
    bn = block[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    return block


def _plain(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The unfolded reference: the same layers one after the other."""
    for layer in block:
        x = layer(x)
    return x


class TestFoldingSequential:
    def test_smoke(self) -> None:
        block = _trained_block().eval()
        with torch.inference_mode():
            out = block(torch.randn(2, 5, 12, 16))
        assert out.shape == (2, 7, 12, 16) and (out >= 0).all()

    @pytest.mark.parametrize("kwargs", [{}, {"stride": 2}, {"dilation": 2}])
    @pytest.mark.parametrize("channels_last", [False, True])
    def test_eval_equals_unfolded(self, kwargs: dict[str, int], channels_last: bool) -> None:
        block = _trained_block(**kwargs).eval()
        x = torch.randn(3, 5, 15, 21)
        if channels_last:
            block.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            folded, plain = block(x), _plain(block, x)
        torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
        if channels_last:
            assert folded.is_contiguous(memory_format=torch.channels_last)

    def test_training_mode_is_plain_sequential(self) -> None:
        block = _trained_block().train()
        reference = copy.deepcopy(block)
        x = torch.randn(4, 5, 9, 11)
        out = block(x)
        expected = _plain(reference, x)
        assert torch.equal(out, expected)
        # batch statistics were used and the running averages moved, exactly as nn.Sequential does
        assert torch.equal(block[1].running_mean, reference[1].running_mean)
        assert not torch.allclose(block[1].running_mean, _trained_block()[1].running_mean)

    def test_state_dict_keys_unchanged(self) -> None:
        folding = FoldingSequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        plain = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        assert list(folding.state_dict()) == list(plain.state_dict())
        folding.load_state_dict(plain.state_dict())  # an old checkpoint loads as it is

    def test_gradients_flow_in_eval_mode(self) -> None:
        block = _trained_block().eval()
        x = torch.randn(2, 5, 8, 8, requires_grad=True)
        block(x).sum().backward()
        assert x.grad is not None and block[0].weight.grad is not None and block[1].weight.grad is not None
        assert block[0].weight.grad.abs().sum() > 0

    def test_folds_are_kept_while_weights_are_unchanged(self) -> None:
        block = _trained_block().eval()
        x = torch.randn(1, 5, 8, 8)
        with torch.inference_mode():
            block(x)
            kept = _FOLDS[block][0][1]
            block(x)
            assert _FOLDS[block][0][1] is kept  # reused, not made again

    def test_folds_follow_optimiser_steps_and_loaded_weights(self) -> None:
        block = _trained_block().eval()
        x = torch.randn(2, 5, 10, 10)
        with torch.inference_mode():
            before = block(x)
        # a training step changes weights and running statistics in place (test-time adaptation)
        block.train()
        optimiser = torch.optim.SGD(block.parameters(), lr=0.5)
        block(torch.randn(4, 5, 10, 10)).square().mean().backward()
        optimiser.step()
        block.eval()
        with torch.inference_mode():
            after, plain = block(x), _plain(block, x)
        torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after, before, atol=1e-3)
        # weights loaded into the same tensors
        other = _trained_block()
        with torch.no_grad():
            other[0].weight.mul_(-1)
        block.load_state_dict(other.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(block(x), _plain(block, x), rtol=1e-5, atol=1e-5)

    def test_deepcopy_does_not_share_folds(self) -> None:
        block = _trained_block().eval()
        x = torch.randn(1, 5, 8, 8)
        with torch.inference_mode():
            block(x)
        twin = copy.deepcopy(block)
        with torch.no_grad():
            twin[1].running_mean.add_(1.0)
        with torch.inference_mode():
            torch.testing.assert_close(twin(x), _plain(twin, x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(block(x), _plain(block, x), rtol=1e-5, atol=1e-5)

    def test_export_under_no_grad_folds_in_the_graph(self) -> None:
        block = _trained_block().eval()
        x = torch.randn(2, 5, 8, 8)
        with torch.no_grad():
            program = torch.export.export(block, (x,))
            torch.testing.assert_close(program.module()(x), _plain(block, x), rtol=1e-5, atol=1e-5)
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("batch_norm" in op for op in ops) and any("conv" in op for op in ops)
        assert block not in _FOLDS  # nothing kept from a traced call

    def test_conv_without_following_batch_norm_runs_as_is(self) -> None:
        block = FoldingSequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
        x = torch.randn(1, 3, 6, 6)
        with torch.inference_mode():
            assert torch.equal(block(x), _plain(block, x))
        assert block not in _FOLDS


class TestFoldedNetworks:
    """The teacher and the refiner give, in eval mode, what their unfolded layers give."""

    @staticmethod
    def _unfolded(net: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(FoldingSequential, "forward", nn.Sequential.forward)

    def test_teacher(self, monkeypatch: pytest.MonkeyPatch) -> None:
        torch.manual_seed(1)
        teacher = Teacher.create("unet-tiny", ["a", "b", "c"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
        teacher.net.train()
        for _ in range(3):  # running statistics away from their initial 0 / 1
            teacher.net(torch.rand(2, 3, 32, 48))
        frames = (torch.rand(2, 32, 48, 3) * 255).to(torch.uint8)
        folded = teacher.predict(frames)
        self._unfolded(teacher.net, monkeypatch)
        plain = teacher.predict(frames)
        torch.testing.assert_close(folded.logits, plain.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded.features, plain.features, rtol=1e-4, atol=1e-5)

    def test_refiner(self, monkeypatch: pytest.MonkeyPatch) -> None:
        torch.manual_seed(2)
        refiner = Refiner.create("refine-tiny", ["a", "b", "c"], 6, "sha")
        b, h, w = 2, 32, 48
        x = RefinerInput(torch.randint(0, 3, (b, h, w)), torch.rand(b, h, w), torch.rand(b, h, w) > 0.5,
                         torch.rand(b, 3, h, w), torch.rand(b, 3, h, w), torch.rand(b, 6, h // 4, w // 4))
        refiner.net.train()
        for _ in range(3):
            refiner.net(x)
        folded = refiner.refine(x)
        self._unfolded(refiner.net, monkeypatch)
        torch.testing.assert_close(folded, refiner.refine(x), rtol=1e-4, atol=1e-6)
