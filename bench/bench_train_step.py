"""GaitLite3D training step (forward + backward) on the CPU: fp32 vs bf16 autocast, with and
without channels-last 3-D. This is the measurement behind ``train.amp: auto`` choosing bf16 on
CPUs with native bf16 (AVX512-BF16 / AMX). Shapes are those of the CASIA-B config (width 0.5)
and of the default width 1.0, on a small batch (8 clips x 30 frames) to keep a round short."""
import pytest
import torch

from _common import machine_info
from qgait.models import GaitLite3D
from qgait.train.trainer import cpu_has_bf16

PROVIDERS = {  # name: (autocast dtype, channels_last, role)
    "fp32": (None, False, "baseline"),
    "fp32_channels_last": (None, True, "baseline"),
    "bf16_channels_last": (torch.bfloat16, True, "qgait"),
}


@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_train_step(benchmark, provider, width):
    dtype, cl, role = PROVIDERS[provider]
    if dtype is torch.bfloat16 and not cpu_has_bf16():
        pytest.skip("CPU without native bf16")
    torch.manual_seed(0)
    model = GaitLite3D(num_classes=50, width=width)
    x = (torch.rand(8, 1, 30, 64, 44) > 0.5).float()
    if cl:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        (out["embeddings"].float().square().mean() + out["logits"].float().mean()).backward()

    step()  # warm-up: oneDNN primitive creation
    benchmark.group = f"GaitLite3D train step width {width} x[8,1,30,64,44]"
    benchmark.extra_info.update(provider=provider, role=role,
                                ops=2 * 3 * model.macs_per_frame() * 8 * 30, **machine_info())
    benchmark.pedantic(step, rounds=5, iterations=1)
