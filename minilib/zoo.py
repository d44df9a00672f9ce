"""The model zoo: every configuration in the book by name.

    from minilib import zoo
    zoo.names()                                   # what is there
    model = zoo.build("tiny-denoiser-adaln-zero")  # a small model, ready to train
    with torch.device("meta"):                    # a full-size tree, no memory for weights
        big = zoo.build("dit-xl-2")

Each entry names its builder as ``"module:callable"`` and is imported only when
built, so ``import minilib.zoo`` stays instant. Later chapters add their small
and full-size configurations to ``ENTRIES``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    """One named configuration.

    Attributes:
        name: the zoo name, e.g. ``"var-d16"``.
        builder: ``"minilib.module:Callable"`` that returns an ``nn.Module``.
        config: keyword arguments for the builder.
        paper: link to the paper the configuration comes from.
        description: one line for tables.
        reference: file name in the official module-tree references, if any.
    """

    name: str
    builder: str
    config: dict = field(default_factory=dict)
    paper: str = ""
    description: str = ""
    reference: str | None = None

    def resolve_builder(self):
        module_name, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module_name), attr)


DIT_PAPER = "https://arxiv.org/abs/2212.09748"

ENTRIES: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    """Add an entry; a name can only be registered once."""
    if entry.name in ENTRIES:
        raise ValueError(f"zoo entry {entry.name!r} is already registered")
    ENTRIES[entry.name] = entry
    return entry


register(ZooEntry(
    "tiny-denoiser-adaln-zero", "minilib.adaln:TinyDenoiser",
    dict(image_size=16, patch_size=4, in_channels=1, hidden_size=96, depth=4, num_heads=4,
         num_classes=10, conditioning="adaln_zero"),
    DIT_PAPER, "Chapter 3: small DiT-style denoiser conditioned by adaLN-Zero"))
register(ZooEntry(
    "tiny-denoiser-in-context", "minilib.adaln:TinyDenoiser",
    dict(image_size=16, patch_size=4, in_channels=1, hidden_size=96, depth=4, num_heads=4,
         num_classes=10, conditioning="in_context"),
    DIT_PAPER, "Chapter 3: the same denoiser, conditioned by two extra tokens"))


# Chapter 5: the diffusion transformer at full size (256 px: 32x32x4 latents, learned sigma).
# guided_channels=3: classifier-free guidance as the official code applies it (first 3 of the 4
# latent channels, see DiT.forward_with_cfg), so that official checkpoints sample as they do there.
for _name, _width, _depth, _heads in [("dit-s-2", 384, 12, 6), ("dit-b-2", 768, 12, 12), ("dit-xl-2", 1152, 28, 16)]:
    register(ZooEntry(
        _name, "minilib.dit:DiT",
        dict(input_size=32, patch_size=2, hidden_size=_width, depth=_depth, num_heads=_heads, guided_channels=3),
        DIT_PAPER, f"{_name.upper().replace('-2', '/2')}: 256 px (32x32x4 latents), learned sigma",
        reference=_name.replace("-", "_") + ".json"))

# Chapter 4: latent autoencoders (LDM's KL autoencoder).
LDM_PAPER, MAR_PAPER, SD3_PAPER = ("https://arxiv.org/abs/2112.10752", "https://arxiv.org/abs/2406.11838",
                                   "https://arxiv.org/abs/2403.03206")
register(ZooEntry(
    "small-kl-vae", "minilib.autoencoder:AutoencoderKL",
    dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, resolution=32, norm_groups=8),
    LDM_PAPER, "Chapter 4: small KL autoencoder, 32x32 RGB to a 4x8x8 latent"))
register(ZooEntry(
    "mar-kl16-vae", "minilib.autoencoder:AutoencoderKL",
    dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, resolution=256,
         encoder_attn_resolutions=(16,), decoder_attn_resolutions=(), use_quant_conv=True, scale_factor=0.2325),
    MAR_PAPER, "MAR's KL-16 VAE: 256x256 RGB to a 16x16x16 latent", reference="mar_kl16_vae.json"))
register(ZooEntry(
    "sd3-vae", "minilib.autoencoder:AutoencoderKL",
    dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, resolution=256,
         use_quant_conv=False, scale_factor=1.5305, shift_factor=0.0609),
    SD3_PAPER, "SD3's VAE: 8x downsampling to 16 latent channels", reference="sd3_vae.json"))
register(ZooEntry(
    "sd-vae-ft-ema", "minilib.autoencoder:AutoencoderKL",
    dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, resolution=256, use_quant_conv=True,
         scale_factor=0.18215),
    LDM_PAPER, "Stable Diffusion's KL-f8 VAE (4 latent channels), which DiT decodes with (83,653,863 parameters)"))

# Chapter 7: SD3's MM-DiT (joint attention over text and image tokens).
register(ZooEntry(
    "sd3-medium-mmdit", "minilib.mmdit:MMDiT",
    dict(in_channels=16, hidden_size=1536, depth=24, num_heads=24, pos_embed_max_size=192, patch_size=2,
         adm_in_channels=2048, context_dim=4096),
    SD3_PAPER, "SD3 Medium's MM-DiT (2B)", reference="sd3_medium_mmditx.json"))
register(ZooEntry(
    "sd3.5-medium-mmdit", "minilib.mmdit:MMDiT",
    dict(in_channels=16, hidden_size=1536, depth=24, num_heads=24, pos_embed_max_size=384, patch_size=2,
         adm_in_channels=2048, context_dim=4096, qk_norm="rms", x_block_self_attn_layers=list(range(13))),
    SD3_PAPER, "SD3.5 Medium's MMDiT-X (extra image self-attention in blocks 0-12)",
    reference="sd35_medium_mmditx.json"))
register(ZooEntry(
    "sd3.5-large-mmdit", "minilib.mmdit:MMDiT",
    dict(in_channels=16, hidden_size=2432, depth=38, num_heads=38, pos_embed_max_size=192, patch_size=2,
         adm_in_channels=2048, context_dim=4096, qk_norm="rms"),
    SD3_PAPER, "SD3.5 Large's MM-DiT (8B)", reference="sd35_large_mmditx.json"))


# Chapter 8: few-shot generation with a set encoder (VFSDDPM). -- entries below this line
FSDM_PAPER = "https://arxiv.org/abs/2205.15463"
register(ZooEntry(
    "vfsddpm-cifar100", "minilib.fewshot:VFSDDPM",
    dict(image_size=32, in_channels=3, patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0,
         hdim=384, encoder_depth=6, encoder_heads=6, encoder_mlp_ratio=4.0, sample_size=6,
         conditioning="film", context="deterministic"),
    FSDM_PAPER, "VFSDDPM (the JAX port's CIFAR-100 configuration): sViT set encoder (hdim 384, 6 LSA blocks) + DiT-S/2-sized generator, "
                "32 px, sets of 6 (counts pinned in tests/test_fewshot.py)"))
register(ZooEntry(
    "vfsddpm-shapes-small", "minilib.fewshot:VFSDDPM",
    dict(image_size=16, in_channels=3, patch_size=4, encoder_patch_size=8, hidden_size=96, depth=4, num_heads=4,
         hdim=64, encoder_depth=2, sample_size=6, conditioning="film", context="deterministic",
         context_dropout_prob=0.1),
    FSDM_PAPER, "Chapter 8: small few-shot DiT for 16x16 shapes, sets of 6, with a null context for guidance"))

# Chapter 9: VAR's multi-scale VQ-VAE. -- entries below this line
register(ZooEntry(
    "var-vqvae", "minilib.vqvae:VQVAE",
    dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "https://arxiv.org/abs/2404.02905",
    "VAR's multi-scale VQ-VAE (vae_ch160v4096z32): 256 px to 10 token maps 1x1..16x16 over 4096 codes",
    reference="var_vqvae_ch160v4096z32.json"))
# The small one has 4 channels per GroupNorm group (fewer erase colour, as chapter 4 found) and the
# cosine lookup (using_znorm), which keeps all 256 codes in use.
register(ZooEntry(
    "small-var-vqvae", "minilib.vqvae:VQVAE",
    dict(vocab_size=256, z_channels=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4,
         using_znorm=True, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4, 6, 8)),
    "https://arxiv.org/abs/2404.02905",
    "Chapter 9: small multi-scale VQ-VAE, 32x32 shapes to 6 token maps 1x1..8x8 (130 tokens) over 256 codes"))

# Chapter 10: VAR transformers. -- entries below this line
VAR_PAPER = "https://arxiv.org/abs/2404.02905"
for _depth in (16, 20, 24, 30):
    register(ZooEntry(
        f"var-d{_depth}", "minilib.var:build_var", dict(depth=_depth),
        VAR_PAPER, f"VAR-d{_depth}: next-scale prediction on ImageNet 256 px (10 scales, 680 tokens), "
                   f"width {64 * _depth}, {_depth} heads; the VQ-VAE is not part of it",
        reference=f"var_d{_depth}.json"))
# Chapter 10's small pair, for 16x16 digits: a VQ-VAE with a 4x4 feature map quantised at
# 1x1, 2x2, 3x3 and 4x4 (30 tokens over 64 codes), and a 3-block VAR of width 128 on it.
register(ZooEntry(
    "small-var-digits-vqvae", "minilib.vqvae:VQVAE",
    dict(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, in_channels=1,
         share_quant_resi=4, v_patch_nums=(1, 2, 3, 4)),
    VAR_PAPER, "Chapter 10: small multi-scale VQ-VAE, 16x16 digits to 4 token maps 1x1..4x4 over 64 codes"))
register(ZooEntry(
    "small-var-digits", "minilib.var:VAR",
    dict(num_classes=10, depth=3, embed_dim=128, num_heads=4, patch_nums=(1, 2, 3, 4), Cvae=8, vocab_size=64),
    VAR_PAPER, "Chapter 10: small class-conditional VAR (3 blocks, width 128) on small-var-digits-vqvae's tokens"))

# Chapters 11-12: MAR (masked autoregression with the diffusion loss). -- entries below this line
# The released checkpoints' settings (the README's evaluation commands): 256 px, KL-16 latents
# (16x16 tokens of 16 channels), 64 buffer tokens; they differ in width, depth and the diffusion head.
_MAR_COMMON = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
                   label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                   num_sampling_steps="100", diffusion_batch_mul=4)
for _name, _width, _depth, _heads, _head_depth, _head_width, _reference, _what in [
        ("mar-base", 768, 12, 12, 6, 1024, "mar_b.json", "MAR-B (208M): 12+12 blocks of width 768, head d6 w1024"),
        ("mar-large", 1024, 16, 16, 8, 1280, "mar_l.json", "MAR-L (478M): 16+16 blocks of width 1024, head d8 w1280"),
        ("mar-huge", 1280, 20, 16, 12, 1536, "mar_h.json", "MAR-H (942M): 20+20 blocks of width 1280, head d12 w1536"),
        ("mar-large-d12w1536", 1024, 16, 16, 12, 1536, "mar_l_diffloss_d12w1536.json",
         "MAR-L with the training script's default head d12 w1536 (main_mar.py's defaults, 557M)")]:
    register(ZooEntry(
        _name, "minilib.mar:MAR",
        dict(encoder_embed_dim=_width, encoder_depth=_depth, encoder_num_heads=_heads, decoder_embed_dim=_width,
             decoder_depth=_depth, decoder_num_heads=_heads, diffloss_d=_head_depth, diffloss_w=_head_width,
             **_MAR_COMMON),
        MAR_PAPER, _what, reference=_reference))
register(ZooEntry(
    "mar-small-digits", "minilib.mar:MAR",
    dict(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, encoder_embed_dim=128, encoder_depth=2,
         encoder_num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, class_num=10,
         attn_dropout=0.0, proj_dropout=0.0, buffer_size=4, diffloss_d=3, diffloss_w=96, num_sampling_steps="50",
         diffusion_batch_mul=4),
    MAR_PAPER, "Chapter 11: small MAR on 8x8 digits, pixels as tokens (16 tokens of 2x2 pixels)"))


# Part V: FLUX.1 (black-forest-labs/flux, src/flux/util.py: configs["flux-dev"], configs["flux-schnell"]; the two
# differ only in guidance_embed). 11,901,408,320 and 11,891,178,560 parameters: half the bytes of the bf16
# transformer weights listed by their safetensors indexes (sources in tests/test_flux.py).
FLUX_CODE = "https://github.com/black-forest-labs/flux"
for _name, _guidance, _what in [
        ("flux.1-dev", True, "FLUX.1 [dev] (11.9B): 19 double-stream + 38 single-stream blocks of width 3072, "
                             "2-D RoPE, guidance-distilled (guidance_in)"),
        ("flux.1-schnell", False, "FLUX.1 [schnell] (11.9B): the same tree without guidance_in")]:
    register(ZooEntry(
        _name, "minilib.flux:Flux",
        dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
             num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10000.0, qkv_bias=True,
             guidance_embed=_guidance),
        FLUX_CODE, _what))


def names() -> list[str]:
    """All registered names, sorted."""
    return sorted(ENTRIES)


def get(name: str) -> ZooEntry:
    """The entry for ``name``; an unknown name lists the closest known ones."""
    if name not in ENTRIES:
        close = difflib.get_close_matches(name, ENTRIES, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"no zoo entry named {name!r}.{hint} Known: {', '.join(names())}")
    return ENTRIES[name]


def build(name: str, device: torch.device | str | None = None, **overrides) -> nn.Module:
    """Build a named model, with any config value overridden by keyword.

    ``device="meta"`` (or building inside ``with torch.device("meta"):``) makes
    the module tree with shapes but no memory: instant even for billions of
    parameters, and enough to count parameters and list state-dict keys.
    """
    entry = get(name)
    builder = entry.resolve_builder()
    accepted = set(inspect.signature(builder).parameters)
    unknown = set(overrides) - accepted
    if unknown:
        raise TypeError(f"zoo.build({name!r}): unknown setting(s) {sorted(unknown)}; "
                        f"{entry.builder} accepts {sorted(accepted)}")
    config = {**entry.config, **overrides}
    if device is None:
        return builder(**config)
    with torch.device(device):
        return builder(**config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def summary_table() -> list[dict]:
    """One row per entry: name, parameter count (built on meta), description, paper."""
    rows = []
    for name in names():
        entry = ENTRIES[name]
        rows.append(dict(name=name, params=count_parameters(build(name, device="meta")),
                         description=entry.description, paper=entry.paper))
    return rows
