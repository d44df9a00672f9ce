"""Property-based tests of minilib's public API with bad input (hypothesis).

For every generated bad input the outcome must be one of two:

* a ``ValueError`` or ``TypeError`` whose message names the argument that is wrong, or
* a correct result (only for inputs that are not actually bad, which these strategies avoid).

Never a deep error from inside torch, a ``ZeroDivisionError``, a model that builds with a
nonsensical size, a NaN from finite input, or a hang (each example has a deadline).

Each family draws one bad argument at a time, so the test knows which name the message
must contain. ``pytest --hypothesis-show-statistics tests/test_properties.py`` prints how
many cases each family ran.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 40  # per test; the suite stays within a few seconds per family
SETTINGS = settings(max_examples=EXAMPLES, deadline=5000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

NAN, INF = float("nan"), float("inf")
# Values that are wrong for each kind of argument (bool is an int in Python and is left out).
BAD = {
    "size": [0, -1, -8, 2.5, "8", None, NAN],       # a positive int: widths, depths, counts, sizes
    "ratio": [0.0, -1.0, NAN, INF, "4"],            # a positive, finite number
    "prob": [-0.1, 1.0, 1.5, NAN, "0.1"],           # a probability in [0, 1)
    "nonneg": [-1.0, -1e-3, NAN, INF],              # a non-negative, finite number
}
BAD["unit"] = [-0.1, 1.5, NAN, "0.1"]  # a number in [0, 1] (1 allowed: drop every label)
BAD["count"] = [-1, -8, 2.5, "8", None, NAN]  # an int >= 0: numbers of extra tokens, ...
BAD["size_or_none"] = [value for value in BAD["size"] if value is not None]  # where None means "any"


def _build(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def expect_clear_error(call, *names: str):
    """``call()`` must raise ValueError or TypeError naming one of ``names``."""
    try:
        result = call()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(name in message for name in names), (
            f"the error does not name {' or '.join(names)}: {type(error).__name__}: {message}")
        return
    except Exception as error:  # a deep or unexpected error is what this suite exists to catch
        pytest.fail(f"unclear error for bad {'/'.join(names)}: {type(error).__name__}: {error}")
    pytest.fail(f"bad {'/'.join(names)} was accepted silently (returned {type(result).__name__})")


# --- constructors ---------------------------------------------------------------------------


@dataclass
class Family:
    target: str                     # "module:callable"
    valid: dict                     # small valid keyword arguments
    kinds: dict = field(default_factory=dict)  # argument name -> kind of value (a key of BAD)

    def __repr__(self) -> str:
        return self.target.split(":")[1]


FAMILIES = [
    Family("minilib.dit:DiT",
           dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0,
                class_dropout_prob=0.1, num_classes=10),
           dict(input_size="size", patch_size="size", in_channels="size", hidden_size="size", depth="size",
                num_heads="size", mlp_ratio="ratio", class_dropout_prob="prob", num_classes="size")),
    Family("minilib.mmdit:MMDiT",
           dict(in_channels=4, hidden_size=32, depth=2, num_heads=2, pos_embed_max_size=8, adm_in_channels=8,
                context_dim=16),
           dict(in_channels="size", hidden_size="size", depth="size", num_heads="size", pos_embed_max_size="size",
                patch_size="size", adm_in_channels="size_or_none", context_dim="size_or_none", mlp_ratio="ratio",
                register_length="count")),
    Family("minilib.var:VAR",
           dict(num_classes=10, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2), Cvae=8, vocab_size=16),
           dict(num_classes="size", depth="size", embed_dim="size", num_heads="size", mlp_ratio="ratio",
                drop_path_rate="prob", cond_drop_rate="prob", Cvae="size", vocab_size="size", norm_eps="ratio")),
    Family("minilib.mar:MAR",
           dict(img_size=32, vae_stride=8, patch_size=1, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, vae_embed_dim=4, class_num=10,
                buffer_size=4, diffloss_d=1, diffloss_w=32, num_sampling_steps="10", diffusion_batch_mul=1),
           dict(img_size="size", vae_stride="size", patch_size="size", encoder_embed_dim="size",
                encoder_depth="size", encoder_num_heads="size", decoder_embed_dim="size", decoder_depth="size",
                decoder_num_heads="size", mlp_ratio="ratio", vae_embed_dim="size", class_num="size",
                label_drop_prob="unit", attn_dropout="prob", proj_dropout="prob", diffloss_d="size",
                diffloss_w="size", diffusion_batch_mul="size")),
    Family("minilib.diffloss:DiffLoss", dict(target_channels=4, z_channels=8, depth=1, width=16, num_sampling_steps="10"),
           dict(target_channels="size", z_channels="size", depth="size", width="size")),
    Family("minilib.autoencoder:AutoencoderKL",
           dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, resolution=16, norm_groups=4),
           dict(ch="size", num_res_blocks="size", z_channels="size", resolution="size", in_channels="size",
                norm_groups="size", scale_factor="ratio")),
    Family("minilib.fewshot:VFSDDPM",
           dict(image_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, hdim=32, encoder_depth=1,
                sample_size=3, in_channels=3),
           dict(image_size="size", in_channels="size", patch_size="size", hidden_size="size", depth="size",
                num_heads="size", mlp_ratio="ratio", hdim="size", encoder_depth="size", sample_size="size",
                context_dropout_prob="prob")),
    Family("minilib.adaln:TinyDenoiser",
           dict(image_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10),
           dict(image_size="size", patch_size="size", in_channels="size", hidden_size="size", depth="size",
                num_heads="size", num_classes="size", class_dropout_prob="prob")),
    Family("minilib.patch_embed:PatchEmbed", dict(patch_size=2, in_chans=3, embed_dim=8, img_size=8),
           dict(patch_size="size", in_chans="size", embed_dim="size", img_size="size_or_none")),
    Family("minilib.timestep:TimestepEmbedder", dict(hidden_size=16, frequency_embedding_size=32),
           dict(hidden_size="size", frequency_embedding_size="size")),
    Family("minilib.timestep:LabelEmbedder", dict(num_classes=10, hidden_size=16, dropout_prob=0.1),
           dict(num_classes="size", hidden_size="size", dropout_prob="prob")),
    Family("minilib.quantize:VectorQuantizer", dict(vocab_size=16, dim=8),
           dict(vocab_size="size", dim="size", beta="nonneg", dead_code_threshold="nonneg", usage_decay="prob")),
    Family("minilib.quantize:ResidualVQ", dict(depth=2, vocab_size=16, dim=8),
           dict(depth="size", vocab_size="size", dim="size", beta="nonneg")),
    Family("minilib.text_encoder:TextEncoder", dict(dim=16, depth=1, num_heads=2, max_length=8),
           dict(dim="size", depth="size", num_heads="size", max_length="size", vocab_size="size")),
    Family("minilib.metrics:Oracle", dict(in_channels=3, num_classes=4, width=8, feature_dim=16),
           dict(in_channels="size", num_classes="size", width="size", feature_dim="size")),
]


def bad_constructor_calls(family: Family):
    """Strategy: (argument name, bad value) for one family."""
    return st.sampled_from(sorted(family.kinds)).flatmap(
        lambda name: st.tuples(st.just(name), st.sampled_from(BAD[family.kinds[name]])))


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_constructors_name_the_bad_argument(family):
    build = _build(family.target)
    bad_values = sum(len(BAD[kind]) for kind in family.kinds.values())

    @settings(SETTINGS, max_examples=2 * bad_values)  # enough draws to meet (nearly) every bad value
    @given(bad_constructor_calls(family))
    def check(case):
        name, value = case
        expect_clear_error(lambda: build(**{**family.valid, name: value}), name)

    build(**family.valid)  # the valid configuration itself builds
    check()


@pytest.mark.parametrize("target, valid, first, second", [
    ("minilib.dit:DiT", FAMILIES[0].valid, "hidden_size", "num_heads"),
    ("minilib.dit:DiT", FAMILIES[0].valid, "input_size", "patch_size"),
    ("minilib.mmdit:MMDiT", FAMILIES[1].valid, "hidden_size", "num_heads"),
    ("minilib.var:VAR", FAMILIES[2].valid, "embed_dim", "num_heads"),
    ("minilib.mar:MAR", FAMILIES[3].valid, "encoder_embed_dim", "encoder_num_heads"),
    ("minilib.mar:MAR", FAMILIES[3].valid, "img_size", "vae_stride"),
    ("minilib.adaln:TinyDenoiser", FAMILIES[7].valid, "image_size", "patch_size"),
    ("minilib.fewshot:VFSDDPM", FAMILIES[6].valid, "image_size", "patch_size"),
])
def test_sizes_that_do_not_divide_are_named(target, valid, first, second):
    build = _build(target)

    @SETTINGS
    @given(st.integers(min_value=2, max_value=7))
    def check(factor):
        value = valid[second] * factor + 1  # never a multiple of the second size
        if target.endswith("MAR") and first == "img_size":
            value = valid["vae_stride"] * factor + 3
        expect_clear_error(lambda: build(**{**valid, first: value}), first, second)

    check()


# --- forward passes -------------------------------------------------------------------------


def _dit():
    from minilib.dit import DiT
    model = DiT(**FAMILIES[0].valid).eval()
    return model, dict(x=torch.randn(2, 4, 8, 8), t=torch.tensor([10.0, 500.0]), y=torch.tensor([1, 3]))


def _mmdit():
    from minilib.mmdit import MMDiT
    model = MMDiT(**FAMILIES[1].valid).eval()
    return model, dict(x=torch.randn(2, 4, 8, 8), t=torch.tensor([0.2, 0.9]), y=torch.randn(2, 8),
                       context=torch.randn(2, 5, 16))


def _tiny():
    from minilib.adaln import TinyDenoiser
    model = TinyDenoiser(**FAMILIES[7].valid).eval()
    return model, dict(x=torch.randn(2, 1, 8, 8), t=torch.tensor([0.1, 0.7]), y=torch.tensor([0, 9]))


def _patch_embed():
    from minilib.patch_embed import PatchEmbed
    return PatchEmbed(**FAMILIES[8].valid), dict(x=torch.randn(2, 3, 8, 8))


def _autoencoder():
    from minilib.autoencoder import AutoencoderKL
    return AutoencoderKL(**FAMILIES[5].valid).eval(), dict(x=torch.randn(2, 3, 16, 16))


def _oracle():
    from minilib.metrics import Oracle
    return Oracle(**FAMILIES[14].valid).eval(), dict(x=torch.randn(2, 3, 16, 16))


def _vfsddpm():
    from minilib.fewshot import VFSDDPM
    model = VFSDDPM(**FAMILIES[6].valid).eval()
    return model, dict(x=torch.randn(2, 3, 8, 8), t=torch.tensor([5.0, 700.0]), context=torch.randn(2, 32))


def _mar():
    from minilib.mar import MAR
    torch.manual_seed(0)
    model = MAR(**FAMILIES[3].valid).eval()
    return model, dict(imgs=torch.randn(2, 4, 4, 4), labels=torch.tensor([1, 7]))


def _vqvae():
    from minilib.vqvae import VQVAE
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=8, ch=32, v_patch_nums=(1, 2), test_mode=True).eval()
    return vae.img_to_idxBl, dict(inp_img_no_grad=torch.rand(2, 3, 32, 32) * 2 - 1)


FORWARDS = {"DiT": _dit, "MMDiT": _mmdit, "TinyDenoiser": _tiny, "PatchEmbed": _patch_embed,
            "AutoencoderKL": _autoencoder, "Oracle": _oracle, "VFSDDPM": _vfsddpm, "MAR": _mar,
            "VQVAE.img_to_idxBl": _vqvae}


def corruptions(inputs: dict):
    """Strategy: (input name, corrupted value) for one input at a time."""
    options = []
    for name, value in inputs.items():
        if name == "t":  # any real dtype is a valid time (DiT's official timesteps are ints): shape only
            options += [(name, value[0]), (name, value[None])]
        elif value.is_floating_point():
            options += [(name, (value * 100).to(torch.uint8)), (name, value.long()), (name, value[0]),
                        (name, value[None]), (name, value.double())]
            if value.ndim == 4:
                options += [(name, value[:, :1].repeat(1, value.shape[1] + 1, 1, 1)), (name, value[..., :-1, :-1])]
            if value.ndim >= 2 and name != "x":
                options += [(name, value[..., :-1])]
        else:
            options += [(name, value.float() + 0.5), (name, value - 100), (name, value + 100)]
        options += [(name, value[:1])]  # a batch that does not match the other inputs
    if len(inputs) == 1:  # a single input cannot disagree with the others about the batch
        options = [option for option in options if option[1].shape[:1] != (1,) or option[1].ndim != 4]
    if "t" in inputs:
        options += [("t", torch.tensor([NAN, 0.5])), ("t", torch.tensor([INF, 0.5]))]
    return st.sampled_from(options)


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_forward_passes_name_the_bad_input(name):
    model, inputs = FORWARDS[name]()
    with torch.no_grad():
        out = model(*inputs.values())
    outputs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o.float()).all() for o in outputs if isinstance(o, torch.Tensor))

    @SETTINGS
    @given(corruptions(inputs))
    def check(case):
        bad_name, value = case
        with torch.no_grad():
            expect_clear_error(lambda: model(**{**inputs, bad_name: value}), bad_name)

    check()


# --- samplers and schedules -----------------------------------------------------------------


def _velocity_model(x, sigma, **kwargs):
    return x * 0.1


SIGMA_SAMPLERS = ["sample_euler", "sample_heun", "sample_dpmpp_2m"]
BAD_SIGMAS = [torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, NAN, 0.0]), torch.tensor([1.0, 0.5, 0.7, 0.0]),
              torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]), torch.tensor([1.0, -0.5, -1.0]),
              torch.tensor([INF, 0.5, 0.0])]


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS)
def test_flow_samplers_name_bad_sigmas(sampler):
    from minilib import flow
    sample = getattr(flow, sampler)
    x = torch.randn(2, 3, 4, 4)
    assert torch.isfinite(sample(_velocity_model, x, flow.sigmas(4, shift=3.0))).all()

    @SETTINGS
    @given(st.sampled_from(BAD_SIGMAS))
    def check(sigmas):
        expect_clear_error(lambda: sample(_velocity_model, x, sigmas), "sigmas")

    check()


@SETTINGS
@given(st.one_of(st.tuples(st.just("num_steps"), st.sampled_from(BAD["size"])),
                 st.tuples(st.just("shift"), st.sampled_from(BAD["ratio"]))))
def test_flow_sigma_schedule_names_its_bad_argument(case):
    from minilib import flow
    name, value = case
    kwargs = dict(num_steps=8, shift=3.0)
    expect_clear_error(lambda: flow.sigmas(**{**kwargs, name: value}), name)


def _eps_model(x, t, **kwargs):
    return torch.zeros_like(x)


@SETTINGS
@given(st.sampled_from([("temperature", v) for v in (-1.0, NAN, INF, "1")] +
                       [("eta", v) for v in (-0.5, 1.5, NAN)]))
def test_diffusion_samplers_name_bad_settings(case):
    from minilib.diffusion import GaussianDiffusion, beta_schedule
    diffusion = GaussianDiffusion(beta_schedule("linear", 50))
    name, value = case
    run = diffusion.p_sample_loop if name == "temperature" else diffusion.ddim_sample_loop
    expect_clear_error(lambda: run(_eps_model, (2, 1, 4, 4), seed=0, **{name: value}), name)


@SETTINGS
@given(st.sampled_from([NAN, INF, -INF, "4"]))
def test_guidance_scale_must_be_finite(scale):
    from minilib.diffusion import classifier_free_guidance
    expect_clear_error(lambda: classifier_free_guidance(_eps_model, scale), "cfg_scale")


def _small_var():
    from minilib.var import VAR
    from minilib.vqvae import VQVAE
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=8, ch=32, v_patch_nums=(1, 2), test_mode=True)
    return VAR(vae_local=vae, **FAMILIES[2].valid).eval()


@SETTINGS
@given(st.sampled_from([("cfg", v) for v in (NAN, INF, -1.0)] + [("top_k", v) for v in (-1, 2.5)] +
                       [("top_p", v) for v in (-0.1, 1.5, NAN)] + [("B", v) for v in (0, -2)]))
def test_var_sampling_names_bad_settings(case):
    var = _VAR_MODEL.setdefault("var", _small_var())
    name, value = case
    kwargs = dict(B=2, label_B=None, g_seed=0, cfg=1.5, top_k=0, top_p=0.0)
    expect_clear_error(lambda: var.autoregressive_infer_cfg(**{**kwargs, name: value}), name)


_VAR_MODEL: dict = {}


def _small_mar():
    from minilib.mar import MAR
    torch.manual_seed(0)
    return MAR(**FAMILIES[3].valid).eval()


@SETTINGS
@given(st.sampled_from([("num_iter", v) for v in (0, -1, 2.5)] + [("cfg", v) for v in (NAN, INF)] +
                       [("temperature", v) for v in (-1.0, NAN, INF)] + [("bsz", v) for v in (0, -1)]))
def test_mar_sampling_names_bad_settings(case):
    mar = _MAR_MODEL.setdefault("mar", _small_mar())
    name, value = case
    kwargs = dict(bsz=2, num_iter=2, cfg=1.0, temperature=1.0)
    expect_clear_error(lambda: mar.sample_tokens(**{**kwargs, name: value}), name)


_MAR_MODEL: dict = {}


def test_mar_warns_when_sampling_in_train_mode():
    mar = _MAR_MODEL.setdefault("mar", _small_mar())
    mar.train()
    try:
        with pytest.warns(UserWarning, match="eval"):
            mar.sample_tokens(bsz=1, num_iter=1)
    finally:
        mar.eval()


@SETTINGS
@given(st.sampled_from(["zero mask", "empty batch", "nan z"]))
def test_diffusion_loss_never_returns_nan_for_degenerate_input(case):
    from minilib.diffloss import DiffLoss
    torch.manual_seed(0)
    head = DiffLoss(**FAMILIES[4].valid)
    target, z, mask = torch.randn(6, 4), torch.randn(6, 8), torch.ones(6)
    if case == "zero mask":
        expect_clear_error(lambda: head(target, z, torch.zeros(6)), "mask")
    elif case == "empty batch":
        expect_clear_error(lambda: head(target[:0], z[:0], mask[:0]), "target", "z")
    else:
        expect_clear_error(lambda: head(target, z.masked_fill(z > 1, NAN), mask), "z")


def test_tiny_denoiser_rejects_diffusion_timesteps():
    model, inputs = _tiny()
    expect_clear_error(lambda: model(inputs["x"], torch.tensor([999.0, 10.0]), inputs["y"]), "t")


def test_finite_inputs_give_finite_outputs():
    """A forward pass of every small model on finite, valid input is finite (no NaN from finite input)."""
    for name, make in FORWARDS.items():
        model, inputs = make()
        with torch.no_grad():
            out = model(*inputs.values())
        for tensor in (out if isinstance(out, tuple) else (out,)):
            if isinstance(tensor, torch.Tensor):
                assert torch.isfinite(tensor.float()).all(), name
