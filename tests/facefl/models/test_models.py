"""Backbones, the weight bridge and the CosFace head."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from facefl.models import (
    ARCHITECTURES,
    CosFaceHead,
    FastPReLU,
    build_backbone,
    get_architecture,
    load_numpy_state,
    state_to_numpy,
)

# One thread: on a shared 2-core runner, two OpenMP threads spin-wait on each other and run ~10x slower.
torch.set_num_threads(1)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial running statistics so eval-mode checks exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_registry_entries() -> None:
    assert set(ARCHITECTURES) == {"small", "mobilefacenet", "tiny", "dlib-resnet"}
    assert ARCHITECTURES["small"].image_size == 64
    assert ARCHITECTURES["mobilefacenet"].image_size == 112
    assert ARCHITECTURES["dlib-resnet"].image_size == 150
    assert get_architecture("small") is ARCHITECTURES["small"]
    for name, arch in ARCHITECTURES.items():
        assert arch.name == name
        assert arch.preprocessing.image_size == arch.image_size


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(ValueError, match="resnet") as info:
        build_backbone("resnet")
    assert "small" in str(info.value) and "mobilefacenet" in str(info.value)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_shape_and_unit_norm(name: str) -> None:
    arch = ARCHITECTURES[name]
    model = build_backbone(name, seed=0).eval()
    with torch.no_grad():
        out = model(_images(3, arch.image_size))
    assert out.shape == (3, arch.default_embedding_dim)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # the embedding before normalization (distance-based losses train it) normalizes to the output
    with torch.no_grad():
        raw = model.unnormalized(_images(3, arch.image_size))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), out)


def test_custom_embedding_dim_and_train_mode() -> None:
    model = build_backbone("small", embedding_dim=32, seed=1).train()
    out = model(_images(4, 64))
    assert out.shape == (4, 32)
    out.sum().backward()  # gradients flow through the whole network
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError):
        build_backbone("small", embedding_dim=0)


def test_small_parameter_budget() -> None:
    params = sum(p.numel() for p in build_backbone("small").parameters())
    assert 200_000 <= params <= 1_000_000


def test_seed_is_reproducible_and_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = state_to_numpy(build_backbone("small", seed=7))
    assert torch.equal(torch.rand(1), expected_next)  # global stream unaffected by a seeded build
    b = state_to_numpy(build_backbone("small", seed=7))
    c = state_to_numpy(build_backbone("small", seed=8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_state_to_numpy_contents() -> None:
    model = build_backbone("small", seed=0)
    state = state_to_numpy(model)
    float_names = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert set(state) == float_names
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert any(k.endswith("running_var") for k in state)  # BN statistics travel with the weights
    for name, array in state.items():
        assert array.dtype == np.float32 and array.flags.c_contiguous
        assert array.shape == tuple(model.state_dict()[name].shape)
    # A copy: editing it does not change the module.
    name = next(iter(state))
    before = model.state_dict()[name].clone()
    state[name] += 1.0
    assert torch.equal(model.state_dict()[name], before)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_state_round_trip(name: str) -> None:
    size = ARCHITECTURES[name].image_size
    source = build_backbone(name, seed=0)
    _randomise_bn_stats(source)
    source.eval()
    target = build_backbone(name, seed=1).eval()
    x = _images(2, size)
    with torch.no_grad():
        assert not torch.allclose(source(x), target(x))
        # read-only arrays (as decoded from a wire payload) must load too
        tensors = state_to_numpy(source)
        for v in tensors.values():
            v.flags.writeable = False
        load_numpy_state(target, tensors)
        torch.testing.assert_close(source(x), target(x), rtol=0, atol=0)


def test_load_numpy_state_rejects_mismatches_without_partial_writes() -> None:
    model = build_backbone("small", seed=0)
    reference = state_to_numpy(model)
    other = state_to_numpy(build_backbone("small", seed=1))

    missing = dict(other)
    missing.pop("bn.weight")
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\) \['bn.weight'\]"):
        load_numpy_state(model, missing)

    extra = {**other, "head.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="unexpected 1 tensor"):
        load_numpy_state(model, extra)

    wrong_shape = {**other, "bn.weight": np.zeros(7, np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatch for 'bn\.weight'"):
        load_numpy_state(model, wrong_shape)

    after = state_to_numpy(model)
    assert all(np.array_equal(after[k], reference[k]) for k in reference)


def test_load_numpy_state_casts_float64() -> None:
    model = build_backbone("small", seed=0)
    state = {k: v.astype(np.float64) for k, v in state_to_numpy(build_backbone("small", seed=3)).items()}
    load_numpy_state(model, state)
    loaded = state_to_numpy(model)
    assert all(np.array_equal(loaded[k], state[k].astype(np.float32)) for k in state)


def test_fast_prelu_matches_prelu() -> None:
    act = FastPReLU(4)
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.25, -0.5, 0.0, 2.0]))
    x4 = torch.randn(2, 4, 3, 3)
    x2 = torch.randn(5, 4)
    for x in (x4, x2):
        torch.testing.assert_close(act(x), F.prelu(x, act.weight))
        torch.testing.assert_close(act.decomposed(x), F.prelu(x, act.weight))
    # gradients of the decomposed form match too (it is what an exported model computes)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    (g_native,) = torch.autograd.grad(F.prelu(x, act.weight).square().sum(), x)
    (g_decomposed,) = torch.autograd.grad(act.decomposed(x).square().sum(), x)
    torch.testing.assert_close(g_native, g_decomposed)
    assert act.weight.shape == (4,)


def test_cosface_trains_backbone() -> None:
    """One optimiser step on the CosFace loss lowers it (the head and backbone are wired for training)."""
    torch.manual_seed(0)
    model = build_backbone("small", embedding_dim=16, seed=0).train()
    head = CosFaceHead(16, 4, scale=16.0, margin=0.2)
    x, y = _images(16, 64, seed=5), torch.arange(4).repeat(4)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(head(model(x), y), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_onnx_export_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    size = ARCHITECTURES[name].image_size
    model = build_backbone(name, seed=0)
    _randomise_bn_stats(model)
    model.eval()
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
        torch.onnx.export(
            model,
            (_images(1, size),),
            path,
            dynamo=False,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=17,
        )
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    assert "PRelu" not in {node.op_type for node in graph.graph.node}  # FastPReLU -> Relu/Mul/Sub

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _images(3, size, seed=1)
    (got,) = session.run(["embeddings"], {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == expected.shape
    cosine = (got * expected).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999


def test_backbone_from_weights_ignores_the_global_models_extras() -> None:
    from facefl.models import backbone_from_weights

    weights = state_to_numpy(build_backbone("tiny", 20, seed=1))
    extra = {"public_head.weight": np.zeros((3, 20), np.float32)}
    model = backbone_from_weights("tiny", 20, {**weights, **extra})
    assert all(np.array_equal(v, weights[k]) for k, v in state_to_numpy(model).items())
    with pytest.raises(ValueError, match="missing"):
        backbone_from_weights("tiny", 20, {})


# --- parameter groups (partial training) -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_parameter_groups_partition_the_state(name: str) -> None:
    """Every tensor belongs to exactly one group, and a dotted prefix covers whole modules only."""
    from facefl.models import resolve_trainable, trainable_names

    names = list(state_to_numpy(build_backbone(name, seed=0)))
    groups = ARCHITECTURES[name].parameter_groups
    assert groups, f"{name} defines no parameter groups"
    owner: dict[str, str] = {}
    for group in groups:
        selected = trainable_names(names, resolve_trainable(name, [group]))
        assert selected, f"group {group!r} of {name} selects nothing"
        for tensor in selected:
            assert tensor not in owner, f"{tensor} is in {owner.get(tensor)!r} and {group!r}"
            owner[tensor] = group
    assert sorted(owner) == sorted(names)
    for prefixes in groups.values():
        for p in prefixes:
            assert p.endswith(".") or p in names, p  # a dotted module prefix or one exact tensor name


def test_resolve_trainable_names_the_unknown_group() -> None:
    from facefl.models import resolve_trainable, trainable_names

    assert resolve_trainable("small", None) is None
    prefixes = resolve_trainable("small", ["embedding", "last_block"])
    assert prefixes == ("gdconv.", "embedding.", "bn.", "features.5.", "features.6.")
    with pytest.raises(ValueError, match="'stem'") as info:
        resolve_trainable("small", ["embedding", "stem"])
    assert "early, embedding, last_block" in str(info.value)
    names = ["features.1.conv.weight", "features.10.x", "bn.bias", "public_head.weight"]
    # the global model's extras always train; "features.1." does not cover "features.10."
    assert trainable_names(names, ("features.1.",)) == ["features.1.conv.weight", "public_head.weight"]
    assert trainable_names(names, None) == names
