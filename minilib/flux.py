"""FLUX.1: double-stream and single-stream blocks with 2-D rotary positions.

Part V of the book. FLUX.1 [dev] and [schnell] (Black Forest Labs, 2024) are
12-billion-parameter rectified-flow transformers; no paper describes them, the
official inference code does (black-forest-labs/flux: ``src/flux/model.py``,
``src/flux/modules/layers.py``, ``src/flux/math.py``, ``src/flux/sampling.py``,
``src/flux/util.py``). Compared with SD3's MM-DiT (chapter 7, :mod:`minilib.mmdit`):

- the first ``depth`` (19) layers are *double-stream* blocks: SD3's joint block,
  text and image tokens with their own weights meeting in one attention
  (:class:`DoubleStreamBlock`; the tests check it equals :class:`minilib.mmdit.JointBlock`
  when positions are all zero);
- the next ``depth_single_blocks`` (38) are *single-stream* blocks over the
  concatenated ``[text; image]`` sequence with shared weights, in the "parallel"
  layout of ViT-22B (Dehghani et al. 2023): one modulation (shift, scale, gate),
  one fused linear giving q, k, v *and* the MLP's input, attention and MLP side
  by side, one fused output linear (:class:`SingleStreamBlock`);
- queries and keys are RMS-normalised per head (``QKNorm``);
- there is no position table added to the tokens: each token carries integer
  coordinates ``ids = (index, row, column)`` and attention rotates its queries
  and keys by angles proportional to them (rotary embeddings, RoPE, Su et al.),
  16 + 56 + 56 = 128 channels of each head for the three axes
  (:func:`rope_2d`, :func:`apply_rope`). Scores then depend on the *offset* between
  two tokens, never on where they are: the model runs at any resolution and
  aspect ratio;
- image latents (16 channels, 8x downsampled) are cut into 2x2 patches by
  reshaping (:func:`pack`, 64 = 16 * 2 * 2 values per token) and the model
  works on token sequences, ``(B, L, 64) -> (B, L, 64)``;
- the conditioning vector is ``time_in(t) + guidance_in(g) + vector_in(CLIP pooled)``;
  [dev] is guidance-distilled: the guidance scale is an *input* (``guidance_in``),
  [schnell] has none and is otherwise the same tree.

Every submodule has its official name, so the official state dict loads with
``strict=True``, and the full FLUX.1 tree builds in an instant on the meta device
(``zoo.build("flux.1-dev", device="meta")``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adaln import FinalLayer, modulate, zero_init
from .flow import time_snr_shift
from .timestep import timestep_embedding
from .validation import (NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, check_arguments, check_divisible, check_float_input,
                         check_timesteps)

TIME_FACTOR = 1000.0  # times and guidance scales are multiplied by this before the sinusoidal features


# ---------------------------------------------------------------------------
# Rotary position embeddings over several axes
# ---------------------------------------------------------------------------


def rope_2d(ids: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of every token, one block of channels per position axis.

    Axis ``a`` gets ``axes_dim[a]`` channels of each head, that is ``axes_dim[a] / 2``
    rotation planes with frequencies ``omega_i = theta^(-2i / axes_dim[a])``,
    ``i = 0 .. axes_dim[a]/2 - 1`` (from 1 down to about ``1/theta``), and the
    angle of plane ``i`` is ``ids[..., a] * omega_i``. The blocks are concatenated
    in axis order (``math.py``: ``rope``; ``layers.py``: ``EmbedND``). FLUX.1 uses
    ``axes_dim = (16, 56, 56)`` over ids ``(0, row, column)`` of image tokens and
    ``(0, 0, 0)`` of text tokens, ``theta = 10000``: two spatial axes, hence the name.

    Args:
        ids: ``(B, L, n_axes)`` positions (any real numbers; FLUX uses integers).
        axes_dim: channels per axis, each even; their sum is the head width.
    Returns:
        ``(B, L, sum(axes_dim) / 2)`` angles in float32 (float64 if ids are float64).
    """
    if ids.ndim != 3 or ids.shape[-1] != len(axes_dim):
        raise ValueError(f"rope_2d: ids must be (B, L, {len(axes_dim)}) for axes_dim {tuple(axes_dim)}, "
                         f"got {tuple(ids.shape)}")
    if any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"rope_2d: every axes_dim entry must be a positive even number, got {tuple(axes_dim)}")
    dtype = torch.promote_types(ids.dtype, torch.float32)
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)  # (dim / 2,)
        angles.append(ids[..., axis, None].to(dtype) * omega)  # (B, L, dim / 2)
    return torch.cat(angles, dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of neighbouring channels ``(x_{2i}, x_{2i+1})`` by its angle.

        (x_{2i}, x_{2i+1}) -> (cos a_i x_{2i} - sin a_i x_{2i+1},  sin a_i x_{2i} + cos a_i x_{2i+1})

    (``math.py``: ``apply_rope``; pairs are *adjacent* channels, as the official
    weights expect). Applied to queries and keys alike, the score of two tokens
    becomes ``q^T R(a_m)^T R(a_n) k = q^T R(a_n - a_m) k``: a function of the
    offset between their positions only. Computed in float32 at least, like the
    official code, and returned in ``x``'s dtype.

    Args:
        x: ``(B, H, L, d)`` queries or keys, per head.
        angles: ``(B, L, d / 2)`` from :func:`rope_2d`.
    Returns:
        ``(B, H, L, d)``.
    """
    B, H, L, d = x.shape
    if angles.shape != (B, L, d // 2) or d % 2:
        raise ValueError(f"apply_rope: angles must be (B, L, d/2) = ({B}, {L}, {d // 2}) for x {tuple(x.shape)}, "
                         f"got {tuple(angles.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(dtype).reshape(B, H, L, d // 2, 2)
    first, second = pairs.unbind(-1)
    cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (B, 1, L, d/2)
    rotated = torch.stack((cos * first - sin * second, sin * first + cos * second), dim=-1)
    return rotated.reshape(B, H, L, d).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary attention: rotate q and k, ``softmax(q k^T / sqrt(d)) v``, merge the heads.

    ``q, k, v: (B, H, L, d)``, ``angles: (B, L, d / 2)`` -> ``(B, L, H * d)``.
    """
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
    return out.transpose(1, 2).flatten(2)


class EmbedND(nn.Module):
    """:func:`rope_2d` as a module (official name ``pe_embedder``; no parameters, no buffers)."""

    def __init__(self, axes_dim: Sequence[int], theta: float = 10000.0):
        super().__init__()
        self.axes_dim, self.theta = tuple(axes_dim), theta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return rope_2d(ids, self.axes_dim, self.theta)


# ---------------------------------------------------------------------------
# Building blocks (official names)
# ---------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    """``Linear -> SiLU -> Linear`` (``in_layer``, ``out_layer``): ``(B, in_dim) -> (B, hidden_dim)``."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm with FLUX's parameter name ``scale`` (``minilib.mmdit.RMSNorm`` calls it ``weight``).

    ``x / sqrt(mean(x^2) + 1e-6) * scale`` over the last axis, the normalisation
    computed in float32 as officially. ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (``query_norm``, ``key_norm``), each ``(B, H, L, d)``."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, L, 3 H d)`` laid out as ``(3, H, d)`` -> q, k, v, each ``(B, H, L, d)``."""
    B, L, width = qkv.shape
    q, k, v = qkv.reshape(B, L, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return q, k, v


class SelfAttention(nn.Module):
    """The projections of one stream's attention: ``qkv``, ``norm`` (QKNorm), ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, D)`` -> normalised q, k and v, each ``(B, H, L, d)``."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(*self.heads(x), angles))


class Modulation(nn.Module):
    """``lin(SiLU(vec))`` cut into (shift, scale, gate) vectors: 6 for a double block, 3 for a single one.

    ``forward(vec (B, D))`` -> a tuple of ``(B, D)`` tensors, in the official order
    shift, scale, gate (attention) [, shift, scale, gate (MLP)].
    """

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec)).chunk(self.multiplier, dim=-1)


def _mlp(hidden_size: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden, hidden_size))


class DoubleStreamBlock(nn.Module):
    """SD3's joint block with rotary attention: two streams, one attention.

    For each stream s in (img, txt), with its own weights:

        q_s, k_s, v_s = s_attn.qkv(modulate(LN(s), shift1, scale1)), q and k RMS-normalised per head
        [a_txt; a_img] = attention([q_txt; q_img], [k_txt; k_img], [v_txt; v_img], rotated by the positions)
        s = s + gate1 * s_attn.proj(a_s)
        s = s + gate2 * s_mlp(modulate(LN(s), shift2, scale2))

    Text tokens come first in the joint sequence, as in SD3. Unlike SD3's last
    layer, every double block keeps both streams complete (the single blocks
    read the text tokens afterwards).

    ``forward(img (B, L_img, D), txt (B, L_txt, D), vec (B, D), angles (B, L_txt + L_img, d/2))``
    -> ``(img, txt)``, shapes unchanged.
    """

    @check_arguments(hidden_size=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE)
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False):
        super().__init__()
        check_divisible("DoubleStreamBlock", "hidden_size", hidden_size, "num_heads", num_heads)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads, self.hidden_size = num_heads, hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)

    def _stream(self, name: str):
        return (getattr(self, f"{name}_{part}") for part in ("mod", "norm1", "attn", "norm2", "mlp"))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        streams, qkvs, mods = {"txt": txt, "img": img}, {}, {}
        for name, x in streams.items():
            mod, norm1, attn, _, _ = self._stream(name)
            mods[name] = mod(vec)  # shift1, scale1, gate1, shift2, scale2, gate2
            qkvs[name] = attn.heads(modulate(norm1(x), mods[name][0], mods[name][1]))
        q, k, v = (torch.cat((qkvs["txt"][i], qkvs["img"][i]), dim=2) for i in range(3))
        joint = attention(q, k, v, angles)  # (B, L_txt + L_img, D)
        outputs = dict(zip(("txt", "img"), joint.split([txt.shape[1], img.shape[1]], dim=1)))
        for name, x in streams.items():
            _, _, attn, norm2, mlp = self._stream(name)
            shift1, scale1, gate1, shift2, scale2, gate2 = mods[name]
            x = x + gate1.unsqueeze(1) * attn.proj(outputs[name])
            streams[name] = x + gate2.unsqueeze(1) * mlp(modulate(norm2(x), shift2, scale2))
        return streams["img"], streams["txt"]


class SingleStreamBlock(nn.Module):
    """A DiT block with attention and MLP in parallel and fused linears (``layers.py``: ``SingleStreamBlock``).

        shift, scale, gate = modulation(vec)
        h = modulate(LN(x), shift, scale)
        [qkv | m] = linear1(h)                       (3D + mlp_hidden outputs: q, k, v and the MLP input)
        a = attention(q, k, v) with QK-norm and rotary positions
        x = x + gate * linear2([a | GELU(m)])       (one linear: the attention's proj and the MLP's fc2)

    Attention and MLP read the same normalised input and their outputs are
    summed by ``linear2``: two big matrix products per block instead of four
    sequential ones (ViT-22B's parallel layout). :meth:`unfused` shows it is
    exactly the separate-linears form.

    ``forward(x (B, L, D), vec (B, D), angles (B, L, d/2))`` -> ``(B, L, D)``.
    """

    @check_arguments(hidden_size=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE)
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        check_divisible("SingleStreamBlock", "hidden_size", hidden_size, "num_heads", num_heads)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)  # qkv and mlp_in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # proj and mlp_out
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp_in = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, angles), self.mlp_act(mlp_in)), dim=-1))
        return x + gate.unsqueeze(1) * out

    def unfused(self, x: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """The same block written with separate q, k, v, MLP and output linears (slices of the fused weights).

        For reading, and for the test that the fused form computes nothing else.
        """
        D, W1, b1 = self.hidden_size, self.linear1.weight, self.linear1.bias
        W2, b2 = self.linear2.weight, self.linear2.bias
        shift, scale, gate = self.modulation(vec)
        h = modulate(self.pre_norm(x), shift, scale)
        q, k, v = (F.linear(h, W1[i * D:(i + 1) * D], b1[i * D:(i + 1) * D]) for i in range(3))
        mlp_in = F.linear(h, W1[3 * D:], b1[3 * D:])
        B, L, _ = x.shape
        q, k, v = (t.reshape(B, L, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = self.norm.query_norm(q), self.norm.key_norm(k)
        proj = F.linear(attention(q, k, v, angles), W2[:, :D], b2)  # the attention's output projection
        mlp_out = F.linear(self.mlp_act(mlp_in), W2[:, D:])  # the MLP's second layer (bias counted once)
        return x + gate.unsqueeze(1) * (proj + mlp_out)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class Flux(nn.Module):
    """The FLUX.1 transformer (``model.py``: ``Flux``; arguments as ``FluxParams``).

    ``forward(img, img_ids, txt, txt_ids, timesteps, y, guidance=None)``:
        img: ``(B, L_img, in_channels)`` packed noisy latents (:func:`pack`).
        img_ids: ``(B, L_img, n_axes)`` their positions (:func:`image_ids`).
        txt: ``(B, L_txt, context_in_dim)`` text-encoder tokens (T5-XXL for FLUX.1).
        txt_ids: ``(B, L_txt, n_axes)`` (zeros for FLUX.1: :func:`text_ids`).
        timesteps: ``(B,)`` flow times in [0, 1] (1 = noise).
        y: ``(B, vec_in_dim)`` pooled text vector (CLIP-L for FLUX.1).
        guidance: ``(B,)`` guidance scales, required iff ``guidance_embed`` (ignored otherwise,
            as officially, so one sampler serves both models).
    Returns ``(B, L_img, out_channels)``, the predicted velocity of each token.

    Inside: ``vec = time_in(emb(1000 t)) [+ guidance_in(emb(1000 g))] + vector_in(y)``;
    ``depth`` double-stream blocks; ``depth_single_blocks`` single-stream blocks
    on ``[txt; img]``; the image tokens through ``final_layer`` (adaLN then a
    linear, patch size 1: the 2x2 patches were packed into the channels).
    """

    @check_arguments(in_channels=POSITIVE_INT, out_channels=POSITIVE_INT, vec_in_dim=POSITIVE_INT,
                     context_in_dim=POSITIVE_INT, hidden_size=POSITIVE_INT, mlp_ratio=POSITIVE,
                     num_heads=POSITIVE_INT, depth=NON_NEGATIVE_INT, depth_single_blocks=NON_NEGATIVE_INT,
                     theta=POSITIVE)
    def __init__(self, in_channels: int = 64, out_channels: int = 64, vec_in_dim: int = 768,
                 context_in_dim: int = 4096, hidden_size: int = 3072, mlp_ratio: float = 4.0, num_heads: int = 24,
                 depth: int = 19, depth_single_blocks: int = 38, axes_dim: Sequence[int] = (16, 56, 56),
                 theta: float = 10000.0, qkv_bias: bool = True, guidance_embed: bool = True):
        super().__init__()
        check_divisible("Flux", "hidden_size", hidden_size, "num_heads", num_heads)
        head_dim = hidden_size // num_heads
        if sum(axes_dim) != head_dim:
            raise ValueError(f"Flux: axes_dim {tuple(axes_dim)} must add up to the head width "
                             f"hidden_size / num_heads = {head_dim}")
        self.in_channels, self.out_channels, self.hidden_size = in_channels, out_channels, hidden_size
        self.num_heads, self.axes_dim, self.guidance_embed = num_heads, tuple(axes_dim), guidance_embed
        self.pe_embedder = EmbedND(axes_dim, theta)
        self.img_in = nn.Linear(in_channels, hidden_size)
        self.time_in = MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(256, hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias)
                                           for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads, mlp_ratio)
                                           for _ in range(depth_single_blocks))
        self.final_layer = FinalLayer(hidden_size, 1, out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """For training from scratch (the official inference code initialises nothing: every
        tensor comes from the checkpoint): DiT's recipe, Xavier-uniform linear layers with zero
        biases, N(0, 0.02) time and guidance MLPs, and every modulation and the output layer at
        zero, so that each block starts as the identity and the model outputs exactly 0.
        RMSNorm scales stay 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.time_in, self.guidance_in):
            if isinstance(embedder, MLPEmbedder):
                nn.init.normal_(embedder.in_layer.weight, std=0.02)
                nn.init.normal_(embedder.out_layer.weight, std=0.02)
        for block in self.double_blocks:
            zero_init(block.img_mod.lin)
            zero_init(block.txt_mod.lin)
        for block in self.single_blocks:
            zero_init(block.modulation.lin)
        zero_init(self.final_layer.adaLN_modulation[1])
        zero_init(self.final_layer.linear)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> None:
        like = self.img_in.weight
        check_float_input("Flux", "img", img, ndim=3, layout="(B, L_img, in_channels)", like=like)
        check_float_input("Flux", "txt", txt, ndim=3, layout="(B, L_txt, context_in_dim)", like=like)
        check_float_input("Flux", "y", y, ndim=2, layout="(B, vec_in_dim)", like=like)
        B = img.shape[0]
        for name, x, width in (("img", img, self.img_in.in_features), ("txt", txt, self.txt_in.in_features)):
            if x.shape[0] != B or x.shape[2] != width:
                raise ValueError(f"Flux: {name} must be ({B}, L, {width}), got {tuple(x.shape)}")
        if y.shape != (B, self.vector_in.in_layer.in_features):
            raise ValueError(f"Flux: y must be ({B}, {self.vector_in.in_layer.in_features}), got {tuple(y.shape)}")
        for name, ids, tokens in (("img_ids", img_ids, img), ("txt_ids", txt_ids, txt)):
            if not isinstance(ids, torch.Tensor) or ids.shape != (B, tokens.shape[1], len(self.axes_dim)):
                got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"Flux: {name} must be ({B}, {tokens.shape[1]}, {len(self.axes_dim)}), got {got}")
        check_timesteps("Flux", "timesteps", timesteps)
        if timesteps.shape != (B,):
            raise ValueError(f"Flux: timesteps must be ({B},), got {tuple(timesteps.shape)}")
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("Flux: this model is guidance-distilled (guidance_embed=True); pass guidance (B,)")
            check_timesteps("Flux", "guidance", guidance)
            if guidance.shape != (B,):
                raise ValueError(f"Flux: guidance must be ({B},), got {tuple(guidance.shape)}")

    def conditioning(self, timesteps: torch.Tensor, y: torch.Tensor,
                     guidance: torch.Tensor | None = None) -> torch.Tensor:
        """``vec (B, hidden_size)``, the vector every block is modulated by."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(TIME_FACTOR * timesteps, 256).to(dtype))
        if self.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(TIME_FACTOR * guidance, 256).to(dtype))
        return vec + self.vector_in(y)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img, txt = self.img_in(img), self.txt_in(txt)  # (B, L, D) each
        vec = self.conditioning(timesteps, y, guidance)
        angles = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # (B, L_txt + L_img, d / 2)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, angles)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, angles)
        return self.final_layer(x[:, txt.shape[1]:], vec)  # (B, L_img, out_channels)


# ---------------------------------------------------------------------------
# Latents as token sequences, positions, the time grid (sampling.py)
# ---------------------------------------------------------------------------


def pack(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``(B, C, H, W)`` latents -> ``(B, (H/2)(W/2), 4C)`` tokens of 2x2 patches, channel-major
    (``b c (h ph) (w pw) -> b (h w) (c ph pw)``)."""
    B, C, H, W = latents.shape
    if H % patch or W % patch:
        raise ValueError(f"pack: latent size {H}x{W} must be divisible by {patch}")
    x = latents.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(B, (height/2)(width/2), 4C)`` -> ``(B, C, height, width)``."""
    B, L, width_c = tokens.shape
    h, w = height // patch, width // patch
    if h * w != L or width_c % (patch * patch) or height % patch or width % patch:
        raise ValueError(f"unpack: {L} tokens of {width_c} values do not make a {height}x{width} latent")
    C = width_c // (patch * patch)
    x = tokens.reshape(B, h, w, C, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, height, width)


def image_ids(batch_size: int, h: int, w: int, device=None) -> torch.Tensor:
    """``(B, h*w, 3)`` positions ``(0, row, column)`` of a ``h x w`` token grid, row-major (as :func:`pack`)."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch_size, -1, -1)


def text_ids(batch_size: int, length: int, device=None) -> torch.Tensor:
    """``(B, length, 3)`` zeros: FLUX.1's text tokens all sit at the origin (no order among them)."""
    return torch.zeros(batch_size, length, 3, device=device)


def schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
             shift: bool = True) -> list[float]:
    """FLUX's sampling times (``sampling.py``: ``get_schedule``): ``num_steps + 1`` from 1 down to 0.

    The uniform grid is shifted towards noise by SD3's ``time_snr_shift`` with
    ``shift = exp(mu)``, where mu grows linearly with the number of image tokens,
    from ``base_shift`` at 256 tokens to ``max_shift`` at 4096 (a 1024 px image):
    larger images are shifted more. [schnell] samples without the shift.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    times = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = base_shift + (max_shift - base_shift) * (image_seq_len - 256) / (4096 - 256)
        times = time_snr_shift(math.exp(mu), times)
    return times.tolist()


# The official configurations (util.py, configs["flux-dev"] and configs["flux-schnell"]): they differ
# only in guidance_embed.
FLUX1_DEV = dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                 mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56),
                 theta=10000.0, qkv_bias=True, guidance_embed=True)
FLUX1_SCHNELL = {**FLUX1_DEV, "guidance_embed": False}
