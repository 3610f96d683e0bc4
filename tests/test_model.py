import pytest
import torch
import torch.nn as nn

from qgait.models import GaitLite3D, SeparateFCs, build_model


def _sil(N, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N, 1, T, 64, 44, generator=g) > 0.6).float()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GaitLite3D(num_classes=7, width=0.25).eval()


@pytest.mark.parametrize("T", [1, 2, 37])
def test_shapes(model, T):
    out = model(_sil(3, T))
    P = sum(model.bins)
    assert out["embeddings"].shape == (3, model.embed_dim, P)
    assert out["bnneck"].shape == (3, model.embed_dim, P)
    assert out["logits"].shape == (3, 7, P)
    assert torch.isfinite(out["logits"]).all()


def test_seqL_equals_separate_runs(model):
    lens = [5, 1, 9, 3]
    xs = [_sil(1, t, seed=i) for i, t in enumerate(lens)]
    packed = model(torch.cat(xs, dim=2), seqL=lens)["embeddings"]
    assert packed.shape[0] == len(lens)
    with torch.no_grad():
        for i, x in enumerate(xs):
            # Each packed sequence runs through the trunk alone, so only the batched head
            # matmul's summation order differs from a separate run: fp32 rounding, no leakage
            # between neighbours (which would show up as differences of order 1e-1).
            torch.testing.assert_close(packed[i:i + 1], model(x)["embeddings"],
                                       rtol=1e-5, atol=1e-6)


def test_long_sequence_with_seqL(model):
    lens = [120, 260]
    out = model(_sil(1, sum(lens)), seqL=lens)
    assert out["embeddings"].shape[0] == 2


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="GaitLite3D"):
        model(torch.zeros(2, 64, 44))
    with pytest.raises(ValueError, match="seqL"):
        model(_sil(1, 10), seqL=[4, 5])
    with pytest.raises(ValueError, match="seqL"):
        model(_sil(2, 10), seqL=[5, 5])


def test_separate_fcs_matches_per_part_linear():
    torch.manual_seed(1)
    fc = SeparateFCs(5, 6, 3)
    x = torch.randn(4, 6, 5)
    ref = torch.stack([x[:, :, p] @ fc.weight[p] for p in range(5)], dim=-1)
    torch.testing.assert_close(fc(x), ref)


def test_block_structure_and_plain_convs(model):
    # convert() folds Conv3d + BatchNorm3d + LeakyReLU; quantize_ swaps plain nn.Conv3d.
    blocks = [m for m in model.modules() if isinstance(m, nn.Sequential)
              and any(isinstance(c, nn.Conv3d) for c in m)]
    assert len(blocks) == 6
    for b in blocks:
        assert [type(c) for c in b] == [nn.Conv3d, nn.BatchNorm3d, nn.LeakyReLU]
    assert all(type(m) is nn.Conv3d for m in model.modules() if isinstance(m, nn.Conv3d))


def test_macs_per_frame_matches_traced_convs(model):
    T = 4
    macs = []

    def hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]
        macs.append(out.numel() // T * k * m.in_channels // m.groups)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        model(_sil(1, T))
    for h in hs:
        h.remove()
    assert model.macs_per_frame() == sum(macs)
    text = model.summary()
    assert f"{sum(p.numel() for p in model.parameters()):,d}" in text


def test_forward_is_trunk_then_set_pool_hpp_then_fcs(model):
    from qgait.ops import set_pool_hpp_ref
    x = _sil(1, 9)
    with torch.no_grad():
        feats = torch.cat([model.trunk(x[:, :, :4]), model.trunk(x[:, :, 4:])], dim=2)
        emb = model.fc(set_pool_hpp_ref(feats, [4, 5], model.bins))
        torch.testing.assert_close(model(x, seqL=[4, 5])["embeddings"], emb, rtol=1e-5, atol=1e-6)


def test_no_classifier_and_build_model():
    m = build_model("GaitLite3D", num_classes=0, width=0.25).eval()
    out = m(_sil(2, 3))
    assert out["logits"] is None and out["embeddings"].shape[0] == 2
    with pytest.raises(ValueError, match="unknown model"):
        build_model("GaitSet", num_classes=3)


@pytest.mark.parametrize("T", [1, 2])
def test_short_clip_under_bf16_channels_last(T):
    """torch 2.13's CPU bf16 channels-last Conv3d reads uninitialised memory for the temporal
    padding of a 1-frame, 1-channel input; GaitLite3D pads such clips explicitly, so evaluation
    (bf16 autocast, channels-last) gives the fp32 embedding, the same on every call."""
    torch.manual_seed(0)
    m = GaitLite3D(num_classes=0, width=0.5).eval()
    x = (torch.rand(1, 1, T, 64, 44) > 0.5).float()
    with torch.no_grad():
        ref = m(x)["embeddings"]
        # the explicit padding is exact: the plain stem gives the same fp32 features
        plain = m.stage3(m.stage2(m.pool1(m.stage1(m.stem(x)))))
        torch.testing.assert_close(m.trunk(x), plain, rtol=1e-5, atol=1e-5)
    mc = m.to(memory_format=torch.channels_last_3d)
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    outs = []
    for r in range(3):
        junk = torch.full((1 << 16,), 1e30 * (r + 1))   # leave garbage where the next tensors go
        del junk
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(mc(xc)["embeddings"].float())
    for e in outs:
        assert torch.isfinite(e).all()
        torch.testing.assert_close(e, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
