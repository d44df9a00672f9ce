"""Sampling loops never wait for the device: checked on PyTorch's ``meta`` device.

A meta tensor has a shape and a dtype but no values. Every operation that
would read a value back to the host (``.item()``, ``bool(tensor)``, ``.cpu()``,
``.tolist()``, indexing with a boolean mask) raises on it, which on a GPU is
exactly what makes the host wait for the device at every step. So a sampler
that runs to the end on ``meta`` has no such synchronisation inside its loop.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from minilib.diffloss import DiffLoss
from minilib.diffusion import GaussianDiffusion, beta_schedule, classifier_free_guidance
from minilib.dit import DiT
from minilib.flow import VelocityDenoiser, sample_euler, sample_heun, sigmas

META = torch.device("meta")


def small_dit(learn_sigma: bool) -> DiT:
    return DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
               num_classes=4, learn_sigma=learn_sigma).to(META).eval()


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("seed", [None, 0])
def test_ddpm_and_ddim_loops_run_on_meta(sampler, learn_sigma, seed):
    process = GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=learn_sigma).respace(5)
    model = small_dit(learn_sigma)
    labels = torch.tensor([0, 1, 2, 3], device=META)
    loop = process.p_sample_loop if sampler == "ddpm" else process.ddim_sample_loop
    out = loop(model, (4, 3, 8, 8), dict(y=labels), seed=seed, device=META)
    assert out.device == META and out.shape == (4, 3, 8, 8)


def test_guided_sampling_runs_on_meta():
    process = GaussianDiffusion(beta_schedule("linear", 1000)).respace(3)
    guided = classifier_free_guidance(small_dit(False), cfg_scale=4.0)
    labels = torch.tensor([0, 1, 4, 4], device=META)  # conditional half, then the null class
    assert process.p_sample_loop(guided, (4, 3, 8, 8), dict(y=labels), device=META).device == META


def test_euler_runs_on_meta():
    denoiser = VelocityDenoiser(small_dit(False), timestep_scale=1000.0)
    labels = torch.tensor([0, 1], device=META)
    x = torch.randn(2, 3, 8, 8, device=META)
    assert sample_euler(denoiser, x, sigmas(4).to(META), dict(y=labels)).device == META


class CountReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to Python (``.item()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class LinearVelocity(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, t):
        return self.proj(x) * t.view(-1, 1)


@pytest.mark.parametrize("sampler, reads", [(sample_euler, 0), (sample_heun, 1)])
def test_flow_samplers_read_nothing_back_inside_their_loops(sampler, reads):
    """Heun reads ``sigmas[-1]`` once, before its loop (does it end at 0?); Euler reads nothing."""
    denoiser = VelocityDenoiser(LinearVelocity())
    for steps in (3, 8):
        with torch.no_grad(), CountReads() as counter:
            sampler(denoiser, torch.randn(2, 4), sigmas(steps))
        assert counter.reads == reads, f"{sampler.__name__} with {steps} steps read {counter.reads} values"


def test_diffusion_head_sampling_runs_on_meta():
    head = DiffLoss(target_channels=4, z_channels=16, depth=2, width=32, num_sampling_steps="5").to(META)
    z = torch.randn(6, 16, device=META)
    assert head.sample(z, temperature=0.9, cfg=2.0).shape == (6, 4)


def test_a_synchronising_model_is_caught():
    """The check can fail: a model that reads a value back raises on meta."""

    class Syncing(nn.Module):
        def forward(self, x, t):
            if x.abs().max() > 100:  # bool(tensor): a host-device synchronisation
                x = x.clamp(-100, 100)
            return x

    process = GaussianDiffusion(beta_schedule("linear", 1000)).respace(3)
    with pytest.raises((RuntimeError, NotImplementedError)):
        process.p_sample_loop(Syncing(), (2, 3, 4, 4), device=META)


def test_device_tables_are_copied_once_and_agree_with_the_cpu():
    process = GaussianDiffusion(beta_schedule("linear", 1000))
    x = torch.zeros(3, 2, dtype=torch.float32)
    t = torch.tensor([0, 500, 999])
    first = process.predict_x0_from_eps(x + 1, t, x)
    tables = dict(process._tables)
    second = process.predict_x0_from_eps(x + 1, t, x)
    assert process._tables.keys() == tables.keys()
    assert all(process._tables[k] is tables[k] for k in tables)
    expected = 1 / process.alphas_cumprod[t].sqrt()
    torch.testing.assert_close(first, expected.float().view(3, 1).expand(3, 2))
    torch.testing.assert_close(first, second)


def test_out_of_range_timesteps_still_raise_a_clear_error_on_the_cpu():
    process = GaussianDiffusion(beta_schedule("linear", 1000))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\], got min -1 max 5"):
        process.q_sample(x, torch.tensor([-1, 5]), x)
