"""Models: output shapes on matching data, refusals on data they cannot fit, tiny_lm's contract."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from singlestep.data.base import DataMeta
from singlestep.errors import IncompatibleError
from singlestep.models.cnn import build_cnn
from singlestep.models.mlp import build_mlp
from singlestep.models.tiny_lm import build_tiny_lm
from singlestep.registry import MODELS, load_builtins

load_builtins()

MNIST = DataMeta(task="classification", input_shape=(1, 28, 28), num_classes=10)
CIFAR = DataMeta(task="classification", input_shape=(3, 32, 32), num_classes=10)
VECTORS = DataMeta(task="regression", input_shape=(16,), out_features=3)
TEXT = DataMeta(task="lm", input_shape=(16,), vocab_size=11, block_size=16)


def tiny_lm(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_tiny_lm(TEXT, **{"n_layer": 2, "n_head": 2, "n_embd": 16, **kw}).eval()


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("meta", [MNIST, CIFAR], ids=["mnist", "cifar"])
def test_image_models_give_class_logits(name, meta):
    model = MODELS.get(name)(meta)
    assert model(torch.randn(5, *meta.input_shape)).shape == (5, 10)


def test_mlp_regression_and_layers():
    model = build_mlp(VECTORS, hidden_sizes=[8, 4], activation="tanh", dropout=0.5)
    assert model(torch.randn(7, 16)).shape == (7, 3)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [8, 4, 3]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    linear = build_mlp(VECTORS, hidden_sizes=[])
    assert [type(m) for m in linear.net] == [nn.Linear]
    assert not any(isinstance(m, nn.Dropout) for m in build_mlp(VECTORS).modules())
    with pytest.raises(ValueError, match="activation"):
        build_mlp(VECTORS, activation="swish")
    with pytest.raises(ValueError, match="dropout"):
        build_mlp(VECTORS, dropout=1.0)


def test_cnn_options():
    plain = build_cnn(CIFAR)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())  # off by default
    normed = build_cnn(CIFAR, channels=[8, 8, 8], hidden=32, batch_norm=True, dropout=0.2)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == 3
    assert normed.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 32 -> 16 -> 8 -> 4: the head sees 8 channels of 4x4.
    assert normed.head[1].in_features == 8 * 4 * 4
    assert build_cnn(MNIST).head[1].in_features == 64 * 7 * 7


@pytest.mark.parametrize(
    "builder, meta, kwargs, match",
    [
        (build_mlp, TEXT, {}, "tiny_lm"),
        (build_cnn, TEXT, {}, "tiny_lm"),
        (build_cnn, VECTORS, {}, "channels, height, width"),
        (build_cnn, MNIST, {"channels": [4] * 5}, "halves 28x28"),
        (build_tiny_lm, MNIST, {}, "task 'lm'"),
        (build_tiny_lm, TEXT, {"n_embd": 30, "n_head": 4}, "not divisible"),
    ],
)
def test_incompatible_data_is_refused(builder, meta, kwargs, match):
    with pytest.raises(IncompatibleError, match=match):
        builder(meta, **kwargs)


def test_tiny_lm_shapes_and_weight_tying():
    model = tiny_lm()
    idx = torch.randint(0, 11, (3, 16))
    assert model(idx).shape == (3, 16, 11)
    assert model(idx[:, :5]).shape == (3, 5, 11)
    assert model.lm_head.weight is model.wte.weight
    params = list(model.parameters())
    assert sum(p is model.wte.weight for p in params) == 1  # listed once for the optimizer
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"], state["wte.weight"])
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tiny_lm_is_causal():
    model = tiny_lm()
    idx = torch.randint(0, 11, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 11
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])  # the past does not see the future
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_tiny_lm_without_bias_has_no_bias_parameters():
    model = tiny_lm(bias=False)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_generate_length_cropping_and_reproducibility():
    model = tiny_lm()
    prompt = torch.randint(0, 11, (2, 3))
    out = model.generate(prompt, 25, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 28) and torch.equal(out[:, :3], prompt)  # runs past block_size 16 by cropping
    assert int(out.max()) < 11
    again = model.generate(prompt, 25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    greedy = model.generate(prompt, 6, temperature=0.0)
    top1 = model.generate(prompt, 6, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy, top1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "tiny_lm"])
def test_builder_signature_is_a_schema(name):
    """Meta first, then keyword-only settings with plain annotations and defaults; no **kwargs."""
    params = list(inspect.signature(MODELS.get(name)).parameters.values())
    assert params[0].name == "meta"
    for p in params[1:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.annotation is not inspect.Parameter.empty and p.default is not inspect.Parameter.empty, p.name
