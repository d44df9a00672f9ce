"""minilib's MM-DiT and flow sampling compute what the SD3.5 reference code computes.

``tests/reference/official/sd3.safetensors`` holds the weights of two tiny random MM-DiTs
(``a`` like SD3.5 Medium: qk RMSNorm and MMDiT-X's second attention in block 0; ``b`` like
SD3 Medium: ``a`` without those) and what Stability-AI/sd3.5 (commit in the file's metadata)
computed with them in float32 on the CPU: forward passes with and without ``skip_layers``,
``apply_model``, the sigma grids, single sampler steps, and whole seeded text-to-image runs
with ``CFGDenoiser`` and ``SkipLayerCFGDenoiser``, Euler and DPM-Solver++(2M).
``tests/reference/make_official_sd3.py`` made it. Here the same weights go into
``minilib.mmdit.MMDiT`` with ``strict=True``, every case is recomputed with minilib alone,
and must agree to float32 rounding.

How the pieces correspond: the reference's ``BaseModel.apply_model`` is
``VelocityDenoiser(mmdit, timestep_scale=1000)`` with the text tokens passed as ``context``
(``c_crossattn`` there); ``get_sigmas`` is ``flow.sigmas``; ``get_noise(seed)`` is
``torch.randn`` from a generator seeded with ``seed``; ``SD3LatentFormat.process_out`` is
the SD3 VAE's ``from_latent``.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minilib import zoo
from minilib.flow import (CFGDenoiser, SkipLayerCFGDenoiser, VelocityDenoiser, sample_dpmpp_2m, sample_euler,
                          sigmas)
from minilib.mmdit import MMDiT

REFERENCE = Path(__file__).resolve().parent / "reference" / "official" / "sd3.safetensors"
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
SAMPLERS = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), framework="pt") as f:
        # Fresh copies: the file's tensors lie at arbitrary offsets, and the CPU's matrix
        # kernels round differently (by float32 rounding) for unaligned inputs.
        tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
        metadata = f.metadata()
    assert metadata["commit"] == "fbf8f483f992d8d6ad4eaaeb23b1dc5f523c3b3a"
    return tensors, {key: json.loads(value) for key, value in metadata.items() if key != "commit"}


def case(reference, prefix):
    """The tensors saved under ``prefix/``, without it."""
    tensors, _ = reference
    return {key[len(prefix) + 1:]: value for key, value in tensors.items() if key.startswith(prefix + "/")}


def build(reference, name: str) -> MMDiT:
    """minilib's MMDiT for model ``name`` ("a", "b" or "registers"), loaded with ``strict=True``."""
    _, meta = reference
    config = meta["config"]
    options = dict(meta["models"]["b" if name == "b" else "a"])
    if name == "registers":
        options["register_length"] = meta["register_length"]
    model = MMDiT(in_channels=config["in_channels"], hidden_size=config["hidden_size"], depth=config["depth"],
                  num_heads=config["num_heads"], pos_embed_max_size=config["pos_embed_max_size"],
                  patch_size=config["patch_size"], adm_in_channels=config["adm_in_channels"],
                  context_dim=config["context_dim"], **options).eval()
    weights_a = {key: value.float() for key, value in case(reference, "weights/a").items()}
    # b is a without the SD3.5 additions: fewer tensors, and block 0's image stream keeps
    # the first 6 of its 9 modulation vectors (the rows of the first 6 * hidden outputs).
    state = {key: weights_a[key][:len(tensor)] for key, tensor in model.state_dict().items() if key != "register"}
    if name == "registers":
        state["register"] = reference[0]["weights/register"]
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def models(reference):
    return {name: build(reference, name) for name in ("a", "b", "registers")}


def check(actual, expected, label):
    """assert_close at float32 rounding, and print the worst errors (``pytest -s`` shows them)."""
    error = (actual - expected).abs().max().item()
    relative = error / expected.abs().max().item()
    print(f"{label:28s} max abs error {error:.2e}   relative to max |ref| {relative:.2e}")
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_the_weights_are_exactly_the_reference_models(reference, models):
    # every tensor of a was loaded unchanged (b and registers share them)
    for key, value in case(reference, "weights/a").items():
        assert torch.equal(models["a"].state_dict()[key], value.float()), key
    assert not any("attn2" in key or "ln_q" in key for key in models["b"].state_dict())


@pytest.mark.parametrize("name", ["a", "a_skip0", "a_skip1", "a_wide", "b", "b_skip1", "registers"])
def test_forward_pass(reference, models, name):
    _, meta = reference
    network, x_name, skip_layers = meta["forward_cases"][name]
    inputs = case(reference, "inputs")
    with torch.no_grad():
        velocity = models[network](inputs[x_name], inputs["t"], y=inputs["y"], context=inputs["context"],
                                   skip_layers=skip_layers)
    check(velocity, reference[0][f"forward/{name}"], f"forward/{name}")


def test_skipping_layers_changes_the_output(reference):
    # The reference cases would be too weak if skipping a block changed nothing.
    tensors, _ = reference
    assert (tensors["forward/a"] - tensors["forward/a_skip0"]).abs().max() > 0.1
    assert (tensors["forward/a"] - tensors["forward/a_skip1"]).abs().max() > 0.1


def test_apply_model_is_the_velocity_denoiser(reference, models):
    inputs = case(reference, "inputs")
    torch.testing.assert_close(inputs["t"], 1000 * inputs["sigma"], rtol=0, atol=0)
    with torch.no_grad():
        denoised = VelocityDenoiser(models["a"], timestep_scale=1000)(
            inputs["x"], inputs["sigma"], y=inputs["y"], context=inputs["context"])
    check(denoised, reference[0]["denoised/a"], "denoised/a")


def test_sigma_grids_are_identical(reference):
    _, meta = reference
    for shift, steps in meta["sigma_grids"]:
        expected = reference[0][f"sigmas/shift{shift:g}_steps{steps}"]
        torch.testing.assert_close(sigmas(steps, shift), expected, rtol=0, atol=0)


def conditions(tensors, prefix):
    return ({"context": tensors[f"{prefix}cond_context"], "y": tensors[f"{prefix}cond_y"]},
            {"context": tensors[f"{prefix}uncond_context"], "y": tensors[f"{prefix}uncond_y"]})


@pytest.mark.parametrize("sampler, grid_slice", [("euler", (3, 5)), ("dpmpp_2m", (3, 6))])
def test_single_steps_with_guidance(reference, models, sampler, grid_slice):
    tensors, meta = reference
    grid = meta["step_grid"]
    assert grid[sampler] == list(grid_slice)
    levels = sigmas(grid["steps"], grid["shift"])[slice(*grid_slice)]
    cond, uncond = conditions(tensors, "step/")
    denoiser = CFGDenoiser(VelocityDenoiser(models["a"], timestep_scale=1000))
    out = SAMPLERS[sampler](denoiser, tensors["step/x"], levels,
                            extra_args=dict(cond=cond, uncond=uncond, cond_scale=grid["cond_scale"]))
    check(out, tensors[f"step/{sampler}"], f"step/{sampler}")


@pytest.mark.parametrize("name", ["euler_cfg", "dpmpp_2m_cfg", "dpmpp_2m_slg", "dpmpp_2m_cfg_sd3m"])
def test_whole_seeded_run(reference, models, name):
    tensors, meta = reference
    model_name, sampler, seed, shift, steps, cfg_scale, slg = meta["runs"][name]
    run = case(reference, f"run/{name}")
    # The reference draws its noise on the CPU right after torch.manual_seed(seed).
    noise = torch.randn(run["noise"].shape, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(noise, run["noise"], rtol=0, atol=0)
    denoiser = VelocityDenoiser(models[model_name], timestep_scale=1000)
    if slg:
        guided = SkipLayerCFGDenoiser(denoiser, steps, skip_layers=slg["layers"], scale=slg["scale"],
                                      start=slg["start"], end=slg["end"])
    else:
        guided = CFGDenoiser(denoiser)
    cond, uncond = conditions(tensors, f"run/{name}/")
    sampled = SAMPLERS[sampler](guided, noise, sigmas(steps, shift),
                                extra_args=dict(cond=cond, uncond=uncond, cond_scale=cfg_scale))
    check(sampled, run["sampled"], f"run/{name}")
    with torch.device("meta"):  # only its latent scale and shift are needed
        vae = zoo.build("sd3-vae")
    check(vae.from_latent(sampled), run["latent"], f"run/{name}/latent")


def test_the_skip_layer_run_needs_the_skip_layer_term(reference, models):
    # Without its skip-layer term the guided run lands far from the reference: the case is not vacuous.
    tensors, meta = reference
    _, sampler, seed, shift, steps, cfg_scale, slg = meta["runs"]["dpmpp_2m_slg"]
    cond, uncond = conditions(tensors, "run/dpmpp_2m_slg/")
    plain = sample_dpmpp_2m(CFGDenoiser(VelocityDenoiser(models["a"], timestep_scale=1000)),
                            tensors["run/dpmpp_2m_slg/noise"], sigmas(steps, shift),
                            extra_args=dict(cond=cond, uncond=uncond, cond_scale=cfg_scale))
    assert (plain - tensors["run/dpmpp_2m_slg/sampled"]).abs().max() > 0.05
