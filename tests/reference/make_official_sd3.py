"""Run the SD3.5 reference code on tiny random-weight MM-DiTs and save what it computes.

    .venv/bin/python tests/reference/make_official_sd3.py --official OFFICIAL/sd3.5 --deps DEPS

``OFFICIAL/sd3.5`` is a checkout of https://github.com/Stability-AI/sd3.5 at the commit in
``official_env.OFFICIAL_COMMITS["sd3.5"]``::

    git clone https://github.com/Stability-AI/sd3.5 && git -C sd3.5 checkout fbf8f483f992d8d6ad4eaaeb23b1dc5f523c3b3a

and ``DEPS`` the no-deps packages of ``official_env.py`` (the reference imports pillow and
tqdm from there; einops, numpy and safetensors come from this project's ``.venv``). Its
``sd3_infer.py`` imports ``fire`` for its command line only, which is never used here, so
this script puts an empty stand-in module in its place. The result,
``tests/reference/official/sd3.safetensors``, is read by ``tests/test_official_sd3.py``;
the tests never run this script.

What runs is the reference's own code: ``BaseModel`` (its ``MMDiTX`` configured, as for a
real checkpoint, from the shapes and keys of the weights), ``sd3_infer.load_into``,
``ModelSamplingDiscreteFlow``, ``SD3Inferencer.get_sigmas``, ``get_empty_latent``,
``get_noise`` and ``max_denoise``, the denoisers ``CFGDenoiser`` and
``SkipLayerCFGDenoiser``, the samplers ``sample_euler`` and ``sample_dpmpp_2m``, and
``SD3LatentFormat``. Nothing of it is patched. Two things are done differently:

* ``BaseModel`` reads its weights from a safetensors file; here it gets an object with the
  two methods it calls (``keys``, ``get_tensor``) over a dict of tensors.
* ``SD3Inferencer.do_sampling`` moves everything to CUDA in float16. ``sampling_run``
  below makes the same calls in the same order in float32 on the CPU. The conditioning
  tensors are float16 numbers (exact in float32), so ``fix_cond``'s cast would not
  change them.

The reference ties the width to the depth (``hidden_size = 64 * depth``, ``depth`` heads of
64), so the models have depth 2: width 128, two heads. The last block's context stream is
``pre_only``. Model ``a`` is built like SD3.5 Medium (``qk_norm="rms"`` and MMDiT-X's second
image self-attention in block 0), model ``b`` like SD3 Medium (neither). Every weight is
drawn at random (no layer is zero, so no output is trivial) and rounded to float8 (e4m3),
so that the file stays small: each value is stored exactly, and the reference ran with
those values in float32. ``b`` is ``a`` with those SD3.5 additions taken out: the same
tensors without the RMSNorm gains and ``attn2``, and in block 0's image stream the first 6
of the 9 modulation vectors (the last 3 belonged to ``attn2``).

Saved tensors:

* ``weights/a/*`` (float8), ``weights/register`` (float32);
* ``inputs/*``: the latents, text tokens, pooled vectors and noise levels of the forward cases;
* ``forward/<case>``: ``MMDiTX.forward`` (the velocity), see ``FORWARD_CASES``;
* ``denoised/a``: ``BaseModel.apply_model`` (timestep ``1000 sigma``, then ``x - sigma v``);
* ``sigmas/shift<s>_steps<n>``: ``get_sigmas`` (the same grid for every sampler);
* ``step/euler``, ``step/dpmpp_2m``: one Euler step and two DPM-Solver++(2M) steps
  (the second one second order) with ``CFGDenoiser``, from ``step/x``;
* ``run/<name>/{noise,sampled,latent}`` and ``run/<name>/{cond,uncond}_{context,y}``: whole
  seeded runs, see ``RUNS``; ``sampled`` is the sampler's output, ``latent`` after
  ``SD3LatentFormat.process_out``.

The metadata holds the commit, the configurations and the cases as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_env import OFFICIAL_COMMITS, OUTPUT_DIR, use_official  # noqa: E402

DEPTH = 2
CONFIG = dict(depth=DEPTH, hidden_size=64 * DEPTH, num_heads=DEPTH, in_channels=16, patch_size=2,
              pos_embed_max_size=6, adm_in_channels=32, context_dim=48)
MODELS = {  # the minilib MMDiT options that the reference derives from the checkpoint's keys
    "a": dict(qk_norm="rms", x_block_self_attn_layers=[0]),  # like SD3.5 Medium
    "b": dict(qk_norm=None, x_block_self_attn_layers=[]),  # like SD3 Medium
}
REGISTER_LENGTH = 2  # MMDiTX's register tokens (BaseModel never sets them): model a with 2 registers
PREFIX = "model.diffusion_model."  # where a real checkpoint keeps the MM-DiT
BATCH, CONTEXT_LENGTH = 2, 5

# name -> (model, input latents, skip_layers)
FORWARD_CASES = {
    "a": ("a", "x", []),
    "a_skip0": ("a", "x", [0]),
    "a_skip1": ("a", "x", [1]),
    "a_wide": ("a", "x_wide", []),  # 3 x 5 patches: an off-centre crop of the 6 x 6 position grid
    "b": ("b", "x", []),
    "b_skip1": ("b", "x", [1]),
    "registers": ("registers", "x", []),
}
SIGMA_GRIDS = [(shift, steps) for shift in (1.0, 3.0) for steps in (1, 2, 5, 8, 28, 50)]

# whole runs: name -> (model, sampler, seed, shift, steps, cfg scale, skip_layer_config)
RUNS = {
    "euler_cfg": ("a", "euler", 23, 3.0, 6, 4.5, {}),
    "dpmpp_2m_cfg": ("a", "dpmpp_2m", 24, 3.0, 8, 5.0, {}),
    # SD3.5 Medium's configuration has start 0.01, end 0.2 and 50 steps: guided steps 1..9.
    # With 8 steps and end 0.5 the guided steps are 1, 2 and 3.
    "dpmpp_2m_slg": ("a", "dpmpp_2m", 25, 3.0, 8, 5.0,
                     dict(scale=2.5, start=0.01, end=0.5, layers=[0])),
    "dpmpp_2m_cfg_sd3m": ("b", "dpmpp_2m", 26, 1.0, 6, 5.0, {}),
}
IMAGE_SIZE = 64  # pixels; the latents are 16 x 8 x 8


class Checkpoint:
    """The two methods of a safetensors file that ``BaseModel`` and ``load_into`` call, over a dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key].clone()


def to_float8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float8_e4m3fn)


def random_weights(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random value for every tensor of ``model``'s state dict, as float8 numbers.

    Linear and patch weights ``N(0, 1 / fan_in)`` (the output layer a quarter of that, so
    that velocities are of order 1, as a trained model's), biases ``N(0, 0.1^2)``, RMSNorm
    gains ``1 + N(0, 0.2^2)``, position embeddings ``N(0, 0.5^2)``: every layer that a
    training run would start at zero (adaLN modulations, the final layer) is non-zero here.
    """
    weights = {}
    for key, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if key.endswith("ln_q.weight") or key.endswith("ln_k.weight"):
            value = 1 + 0.2 * noise
        elif key == "pos_embed":
            value = 0.5 * noise
        elif key.endswith(".bias"):
            value = 0.1 * noise
        else:
            value = noise / tensor[0].numel() ** 0.5  # fan_in: in_features (x in_channels * p * p for the conv)
            if key == "final_layer.linear.weight":
                value = value / 4
        weights[key] = to_float8(value)
    return weights


def half_numbers(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """float32 values that are float16 numbers, so a cast to float16 leaves them unchanged."""
    return torch.randn(*shape, generator=generator).half().float()


def build_base_model(sd3_impls, sd3_infer, weights: dict[str, torch.Tensor], shift: float):
    """``BaseModel`` as ``sd3_infer.SD3`` builds it from a checkpoint, in float32 on the CPU."""
    checkpoint = Checkpoint({PREFIX + key: value.float() for key, value in weights.items()})
    model = sd3_impls.BaseModel(shift=shift, file=checkpoint, prefix=PREFIX, device="cpu",
                                dtype=torch.float32).eval()
    sd3_infer.load_into(checkpoint, model, "model.", "cpu", torch.float32)
    return model


def sampling_run(sd3_impls, sd3_infer, model, seed, steps, cfg_scale, sampler, skip_layer_config,
                 cond, uncond):
    """``SD3Inferencer.gen_image`` and ``do_sampling`` for a text-to-image run, call for call,
    in float32 on the CPU (the original moves to CUDA and float16). Returns the noise, the
    sampler's output and the latent after ``process_out``."""
    inferencer = sd3_infer.SD3Inferencer()
    inferencer.sd3 = types.SimpleNamespace(model=model)  # what max_denoise reads
    latent = inferencer.get_empty_latent(BATCH, IMAGE_SIZE, IMAGE_SIZE, seed, "cpu")
    noise = inferencer.get_noise(seed, latent)
    sigmas = inferencer.get_sigmas(model.model_sampling, steps)
    denoise = 1.0  # text-to-image
    sigmas = sigmas[int(steps * (1 - denoise)):]
    extra_args = {"cond": cond, "uncond": uncond, "cond_scale": cfg_scale, "controlnet_cond": None}
    noise_scaled = model.model_sampling.noise_scaling(sigmas[0], noise, latent, inferencer.max_denoise(sigmas))
    sample_fn = getattr(sd3_impls, f"sample_{sampler}")
    denoiser_class = (sd3_impls.SkipLayerCFGDenoiser if skip_layer_config.get("scale", 0) > 0
                      else sd3_impls.CFGDenoiser)
    sampled = sample_fn(denoiser_class(model, steps, skip_layer_config), noise_scaled, sigmas,
                        extra_args=extra_args)
    return noise, sampled, sd3_impls.SD3LatentFormat().process_out(sampled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, type=Path, help="checkout of Stability-AI/sd3.5")
    parser.add_argument("--deps", required=True, type=Path, help="folder of the no-deps packages")
    args = parser.parse_args()
    use_official(args.official, args.deps)
    sys.modules.setdefault("fire", types.ModuleType("fire"))  # sd3_infer's command line, unused
    import mmditx
    import sd3_impls
    import sd3_infer

    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}

    # ---- weights: a from an MMDiTX of its configuration, b from a, registers
    context_config = {"target": "torch.nn.Linear",
                      "params": {"in_features": CONFIG["context_dim"], "out_features": CONFIG["hidden_size"]}}
    mmditx_kwargs = dict(input_size=None, patch_size=CONFIG["patch_size"], in_channels=CONFIG["in_channels"],
                         depth=DEPTH, adm_in_channels=CONFIG["adm_in_channels"],
                         context_embedder_config=context_config,
                         pos_embed_max_size=CONFIG["pos_embed_max_size"],
                         num_patches=CONFIG["pos_embed_max_size"] ** 2, dtype=torch.float32, device="cpu")
    shapes_a = mmditx.MMDiTX(**mmditx_kwargs, qk_norm="rms", x_block_self_attn_layers=[0])
    weights = {"a": random_weights(shapes_a, generator)}
    shapes_b = mmditx.MMDiTX(**mmditx_kwargs, qk_norm=None, x_block_self_attn_layers=[])
    weights["b"] = {key: weights["a"][key][:len(tensor)] for key, tensor in shapes_b.state_dict().items()}
    assert all(weights["b"][key].shape == tensor.shape for key, tensor in shapes_b.state_dict().items())
    register = torch.randn(1, REGISTER_LENGTH, CONFIG["hidden_size"], generator=generator)
    for key, value in weights["a"].items():
        out[f"weights/a/{key}"] = value
    out["weights/register"] = register

    models = {name: build_base_model(sd3_impls, sd3_infer, weights[name], shift=3.0) for name in MODELS}
    for name, model in models.items():  # the reference read the right configuration off the keys
        assert model.diffusion_model.x_block_self_attn_layers == MODELS[name]["x_block_self_attn_layers"]
        assert isinstance(model.diffusion_model.joint_blocks[0].x_block.attn.ln_q, mmditx.RMSNorm) == (
            MODELS[name]["qk_norm"] == "rms")
    with_registers = mmditx.MMDiTX(**mmditx_kwargs, qk_norm="rms", x_block_self_attn_layers=[0],
                                   register_length=REGISTER_LENGTH).eval()
    with_registers.load_state_dict({**{k: v.float() for k, v in weights["a"].items()}, "register": register})
    networks = {"a": models["a"].diffusion_model, "b": models["b"].diffusion_model, "registers": with_registers}

    # ---- forward passes
    inputs = {"x": torch.randn(BATCH, 16, 8, 8, generator=generator),
              "x_wide": torch.randn(BATCH, 16, 6, 10, generator=generator),
              "context": torch.randn(BATCH, CONTEXT_LENGTH, CONFIG["context_dim"], generator=generator),
              "y": torch.randn(BATCH, CONFIG["adm_in_channels"], generator=generator),
              "sigma": torch.tensor([0.8, 0.3])}
    inputs["t"] = models["a"].model_sampling.timestep(inputs["sigma"]).float()  # what apply_model passes
    for key, value in inputs.items():
        out[f"inputs/{key}"] = value
    for case, (network, x_name, skip_layers) in FORWARD_CASES.items():
        out[f"forward/{case}"] = networks[network](inputs[x_name], inputs["t"], y=inputs["y"],
                                                   context=inputs["context"], skip_layers=skip_layers)
    out["denoised/a"] = models["a"].apply_model(inputs["x"], inputs["sigma"], c_crossattn=inputs["context"],
                                                y=inputs["y"])

    # ---- sigma grids (get_sigmas does not depend on the sampler)
    inferencer = sd3_infer.SD3Inferencer()
    for shift, steps in SIGMA_GRIDS:
        out[f"sigmas/shift{shift:g}_steps{steps}"] = inferencer.get_sigmas(
            sd3_impls.ModelSamplingDiscreteFlow(shift=shift), steps)

    # ---- single steps with CFG, from the middle of the shift-3, 8-step grid
    step_cond = {"c_crossattn": half_numbers(BATCH, CONTEXT_LENGTH, CONFIG["context_dim"], generator=generator),
                 "y": half_numbers(BATCH, CONFIG["adm_in_channels"], generator=generator)}
    step_uncond = {"c_crossattn": half_numbers(BATCH, CONTEXT_LENGTH, CONFIG["context_dim"], generator=generator),
                   "y": half_numbers(BATCH, CONFIG["adm_in_channels"], generator=generator)}
    grid = inferencer.get_sigmas(models["a"].model_sampling, 8)
    step_x = torch.randn(BATCH, 16, 8, 8, generator=generator)
    step_args = {"cond": step_cond, "uncond": step_uncond, "cond_scale": 4.0}
    out["step/x"] = step_x
    out["step/cond_context"], out["step/cond_y"] = step_cond["c_crossattn"], step_cond["y"]
    out["step/uncond_context"], out["step/uncond_y"] = step_uncond["c_crossattn"], step_uncond["y"]
    out["step/euler"] = sd3_impls.sample_euler(sd3_impls.CFGDenoiser(models["a"]), step_x, grid[3:5],
                                               extra_args=step_args)
    out["step/dpmpp_2m"] = sd3_impls.sample_dpmpp_2m(sd3_impls.CFGDenoiser(models["a"]), step_x, grid[3:6],
                                                     extra_args=step_args)

    # ---- whole seeded runs
    for name, (model_name, sampler, seed, shift, steps, cfg_scale, slg) in RUNS.items():
        model = build_base_model(sd3_impls, sd3_infer, weights[model_name], shift=shift)
        cond = {"c_crossattn": half_numbers(BATCH, CONTEXT_LENGTH, CONFIG["context_dim"], generator=generator),
                "y": half_numbers(BATCH, CONFIG["adm_in_channels"], generator=generator)}
        uncond = {"c_crossattn": half_numbers(BATCH, CONTEXT_LENGTH, CONFIG["context_dim"], generator=generator),
                  "y": half_numbers(BATCH, CONFIG["adm_in_channels"], generator=generator)}
        noise, sampled, latent = sampling_run(sd3_impls, sd3_infer, model, seed, steps, cfg_scale, sampler, slg,
                                              cond, uncond)
        out[f"run/{name}/noise"], out[f"run/{name}/sampled"], out[f"run/{name}/latent"] = noise, sampled, latent
        out[f"run/{name}/cond_context"], out[f"run/{name}/cond_y"] = cond["c_crossattn"], cond["y"]
        out[f"run/{name}/uncond_context"], out[f"run/{name}/uncond_y"] = uncond["c_crossattn"], uncond["y"]

    for key, value in out.items():
        assert value.dtype in (torch.float32, torch.float8_e4m3fn), (key, value.dtype)
        assert torch.isfinite(value.float()).all(), key
    metadata = {
        "commit": OFFICIAL_COMMITS["sd3.5"],
        "config": json.dumps(CONFIG),
        "models": json.dumps(MODELS),
        "register_length": json.dumps(REGISTER_LENGTH),
        "forward_cases": json.dumps(FORWARD_CASES),
        "sigma_grids": json.dumps(SIGMA_GRIDS),
        "step_grid": json.dumps({"shift": 3.0, "steps": 8, "euler": [3, 5], "dpmpp_2m": [3, 6], "cond_scale": 4.0}),
        "runs": json.dumps(RUNS),
        "image_size": json.dumps(IMAGE_SIZE),
    }
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUTPUT_DIR / "sd3.safetensors"
    save_file({key: value.contiguous() for key, value in out.items()}, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(out)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
