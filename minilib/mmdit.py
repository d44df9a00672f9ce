"""MM-DiT, the transformer of Stable Diffusion 3 (Esser et al., 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis",
https://arxiv.org/abs/2403.03206).

Chapter 7 of the book. DiT conditions on a single vector; a text-to-image model
must also read a *sequence* of text tokens. MM-DiT keeps two streams of tokens,
text ("context", length L_c) and image ("x", length L_x), each with its own
weights, and lets them meet in one attention per block (Fig. 2 of the paper):

    context stream                      image stream
    adaLN(c) -> q_c, k_c, v_c           adaLN(c) -> q_x, k_x, v_x
                \\                          /
       softmax([q_c; q_x] [k_c; k_x]^T / sqrt(d)) [v_c; v_x]     (joint attention)
                /                          \\
    context + gate * proj_c(...)        x + gate * proj_x(...)
    context + gate * MLP_c(...)         x + gate * MLP_x(...)

Both streams are modulated by the same vector ``c = t_emb + y_emb`` (timestep
plus pooled text embedding), as in DiT's adaLN-Zero. Everything else follows
the official inference code (``sd3_impls``' ``mmditx.py``), whose submodule names
are kept so that SD3 / SD3.5 checkpoints load with ``strict=True``:

- a ``DismantledBlock`` is a DiT block cut at the attention, into
  ``pre_attention`` (modulate, project to q, k, v) and ``post_attention``
  (output projection, gated residual, MLP); ``block_mixing`` glues a context
  block and an image block together with one attention;
- the last context block is ``pre_only``: its output would never be read, so it
  keeps only what produces its keys and values;
- SD3.5 normalises queries and keys per head with ``RMSNorm`` (``qk_norm="rms"``)
  to keep attention logits from growing during training;
- SD3.5 Medium (MMDiT-X) adds, in its first 13 image blocks, a second
  self-attention ``attn2`` over the image tokens alone, with its own shift,
  scale and gate (9 modulation vectors instead of 6);
- position embeddings are one large ``pos_embed_max_size**2`` grid of 2-D
  sin-cos vectors, cropped at the centre for each resolution (``cropped_pos_embed``);
- optional learned "register" tokens are prepended to the context;
- ``forward(..., skip_layers=[7, 8, 9])`` leaves some joint blocks out, which
  SD3.5 Medium's reference sampler uses for skip-layer guidance
  (``flow.SkipLayerCFGDenoiser``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adaln import FinalLayer, Mlp, modulate, zero_init
from .patch_embed import PatchEmbed, cropped_pos_embed, get_2d_sincos_pos_embed, unpatchify
from .timestep import TimestepEmbedder
from .validation import (NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, check_arguments, check_divisible, check_float_input,
                         check_timesteps)

QK_NORMS = (None, "rms")


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain (Zhang & Sennrich, 2019).

        RMSNorm(x) = x / sqrt(mean(x_i^2) + eps) * weight

    over the last axis: LayerNorm without the mean subtraction and the bias.
    SD3.5 applies it to each head's queries and keys (``ln_q``, ``ln_k``, a gain
    of width head_dim shared by all heads). ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` on ``(B, L, D)`` tensors.

    Splits D into ``num_heads`` heads of width ``d = D / num_heads``, attends per
    head with ``F.scaled_dot_product_attention`` (a fused kernel on GPU) and joins
    the heads again. ``q, k, v: (B, L, D) -> (B, L, D)``.
    """
    B, L, D = q.shape
    if D % num_heads:
        raise ValueError(f"attention: width {D} is not divisible by num_heads {num_heads}")
    q, k, v = (t.reshape(B, -1, num_heads, D // num_heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d)
    return out.transpose(1, 2).reshape(B, L, D)


class SelfAttention(nn.Module):
    """The projections around an attention, without the attention itself.

    ``pre_attention(x)``: ``(B, L, D) -> (q, k, v)``, each ``(B, L, D)``, from one fused
    ``qkv`` linear layer, with queries and keys RMS-normalised per head when
    ``qk_norm="rms"``. ``post_attention(attn)``: the output projection ``proj``,
    ``(B, L, D) -> (B, L, D)``; a ``pre_only`` attention has no ``proj``.

    The attention is left out so that ``block_mixing`` can run a single one over
    the keys and values of both streams.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None = None, pre_only: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pre_only = pre_only
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        # Identity keeps the official module tree (no keys) when there is no qk-norm.
        self.ln_q = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()
        self.ln_k = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).unbind(2)  # (B, L, heads, d)
        q, k = self.ln_q(q), self.ln_k(k)  # normalise each head's vector
        return q.reshape(B, L, D), k.reshape(B, L, D), v.reshape(B, L, D)

    def post_attention(self, attn: torch.Tensor) -> torch.Tensor:
        if self.pre_only:
            raise ValueError("a pre_only attention has no output projection")
        return self.proj(attn)


class DismantledBlock(nn.Module):
    """A DiT block (adaLN-Zero) cut open at its attention.

    With ``c`` of shape ``(B, D)`` mapped by ``adaLN_modulation`` to shift, scale
    and gate vectors, the full block computes

        (q, k, v) = qkv(modulate(LN(x), shift_msa, scale_msa))          pre_attention
        x = x + gate_msa * proj(attn)                                   post_attention
        x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

    where ``attn`` is computed outside, over this block's and the other
    stream's q, k, v. ``forward(x, c)`` runs the block on its own (then it is
    exactly a DiT block).

    ``pre_only``: only the first line (2 modulation vectors, no ``proj``,
    ``norm2``, ``mlp``); used for the last context block.

    ``x_block_self_attn`` (MMDiT-X, SD3.5 Medium): a second attention ``attn2``
    over this stream's tokens alone, from the same ``LN(x)`` with its own shift
    and scale, added after the joint one:

        x = x + gate_msa * proj(attn) + gate_msa2 * attn2(modulate(LN(x), shift_msa2, scale_msa2))

    The 9 modulation vectors come in the order shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 pre_only: bool = False, x_block_self_attn: bool = False):
        super().__init__()
        if pre_only and x_block_self_attn:
            raise ValueError("a pre_only block cannot have the MMDiT-X self-attention (it has no output)")
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm, pre_only=pre_only)
        if x_block_self_attn:
            self.attn2 = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.n_mods = 2 if pre_only else 9 if x_block_self_attn else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.n_mods * hidden_size))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """``x (B, L, D), c (B, D) -> ((q, k, v), state)``; ``state`` is what
        ``post_attention`` needs (None for a pre_only block)."""
        shift_msa, scale_msa, *mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)  # each (B, D)
        x_norm = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(x_norm, shift_msa, scale_msa))
        if self.pre_only:
            return qkv, None
        gate_msa, shift_mlp, scale_mlp, gate_mlp, *mods = mods
        self_attn2 = None
        if self.x_block_self_attn:
            shift_msa2, scale_msa2, gate_msa2 = mods
            self_attn2 = (self.attn2.pre_attention(modulate(x_norm, shift_msa2, scale_msa2)), gate_msa2)
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, self_attn2)

    def post_attention(self, attn: torch.Tensor, x: torch.Tensor, gate_msa: torch.Tensor, shift_mlp: torch.Tensor,
                       scale_mlp: torch.Tensor, gate_mlp: torch.Tensor, self_attn2=None) -> torch.Tensor:
        """``attn (B, L, D)`` (this stream's rows of the attention output) and the
        state from ``pre_attention`` -> the block's output ``(B, L, D)``."""
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        if self_attn2 is not None:  # MMDiT-X: image tokens alone, so the block runs this attention itself
            (q2, k2, v2), gate_msa2 = self_attn2
            attn2 = attention(q2, k2, v2, self.attn2.num_heads)
            x = x + gate_msa2.unsqueeze(1) * self.attn2.post_attention(attn2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.pre_only:
            raise ValueError("a pre_only block only produces q, k, v; call pre_attention")
        (q, k, v), state = self.pre_attention(x, c)
        return self.post_attention(attention(q, k, v, self.attn.num_heads), *state)


def block_mixing(context: torch.Tensor, x: torch.Tensor, context_block: DismantledBlock,
                 x_block: DismantledBlock, c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """MM-DiT's joint attention: one attention over the text and image tokens together.

    Each stream makes its own q, k, v with its own weights; they are concatenated
    along the sequence, ``q = [q_c; q_x]`` (likewise k, v), so every token attends to
    every token of both streams; the result is split back and each stream
    finishes its own block.

    Args:
        context: ``(B, L_c, D)`` text (and register) tokens.
        x: ``(B, L_x, D)`` image tokens.
        c: ``(B, D)`` the conditioning vector.
    Returns:
        ``(context, x)`` with the same shapes; context is None when
        ``context_block`` is pre_only (the last block).
    """
    if context.ndim != 3 or x.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != x.shape[2]:
        raise ValueError(f"block_mixing expects context (B, L_c, D) and x (B, L_x, D); "
                         f"got {tuple(context.shape)} and {tuple(x.shape)}")
    context_qkv, context_state = context_block.pre_attention(context, c)
    x_qkv, x_state = x_block.pre_attention(x, c)
    q, k, v = (torch.cat((from_context, from_x), dim=1) for from_context, from_x in zip(context_qkv, x_qkv))
    attn = attention(q, k, v, x_block.attn.num_heads)  # (B, L_c + L_x, D)
    context_attn, x_attn = attn.split([context.shape[1], x.shape[1]], dim=1)
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_state)
    x = x_block.post_attention(x_attn, *x_state)
    return context, x


class JointBlock(nn.Module):
    """One MM-DiT layer: a ``context_block`` and an ``x_block`` joined by ``block_mixing``.

    ``forward(context, x, c)``: ``(B, L_c, D), (B, L_x, D), (B, D) -> (context or None, x)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 pre_only: bool = False, x_block_self_attn: bool = False):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm,
                                       x_block_self_attn=x_block_self_attn)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        return block_mixing(context, x, self.context_block, self.x_block, c)


class VectorEmbedder(nn.Module):
    """``Linear -> SiLU -> Linear`` on a vector, e.g. SD3's pooled CLIP text
    embedding (2048 wide). ``(B, input_dim) -> (B, hidden_size)``."""

    def __init__(self, input_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class MMDiT(nn.Module):
    """The multimodal diffusion transformer of SD3 / SD3.5 (class ``MMDiTX`` officially).

    ``forward(x, t, y, context, skip_layers=())``:
        x: ``(B, in_channels, H, W)`` noisy latents, H and W multiples of ``patch_size``,
            at most ``patch_size * pos_embed_max_size``; need not be square.
        t: ``(B,)`` timesteps; SD3 passes ``1000 * sigma``, sigma in [0, 1].
        y: ``(B, adm_in_channels)`` pooled text embedding, required iff
            ``adm_in_channels`` is set. ``c = t_embedder(t) + y_embedder(y)``.
        context: ``(B, L_c, context_dim)`` text tokens, required iff ``context_dim``
            is set; otherwise None or already ``(B, L_c, hidden_size)``.
        skip_layers: indices of joint blocks to leave out (both streams pass
            them unchanged), for skip-layer guidance; empty: the whole model.
    Returns ``(B, out_channels, H, W)`` (SD3 predicts the flow velocity).

    Args:
        in_channels, patch_size, hidden_size, depth, num_heads, mlp_ratio: as in DiT
            (the official code fixes hidden_size = 64 * depth and num_heads = depth).
        pos_embed_max_size: side of the stored grid of position embeddings, in patches.
        adm_in_channels: width of y; None: no ``y_embedder``.
        context_dim: width of the text features; None: no ``context_embedder``.
        out_channels: defaults to in_channels.
        qk_norm: None or ``"rms"`` (SD3.5).
        x_block_self_attn_layers: blocks whose image stream gets MMDiT-X's ``attn2``.
        register_length: learned tokens prepended to the context.
    """

    @check_arguments(in_channels=POSITIVE_INT, hidden_size=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT,
                     pos_embed_max_size=POSITIVE_INT, patch_size=POSITIVE_INT, adm_in_channels=POSITIVE_INT.or_none(),
                     context_dim=POSITIVE_INT.or_none(), out_channels=POSITIVE_INT.or_none(), mlp_ratio=POSITIVE,
                     register_length=NON_NEGATIVE_INT)
    def __init__(self, in_channels: int, hidden_size: int, depth: int, num_heads: int, pos_embed_max_size: int,
                 patch_size: int = 2, adm_in_channels: int | None = None, context_dim: int | None = None,
                 out_channels: int | None = None, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 x_block_self_attn_layers: tuple[int, ...] | list[int] = (), register_length: int = 0):
        super().__init__()
        check_divisible("MMDiT", "hidden_size", hidden_size, "num_heads", num_heads)
        bad_layers = [i for i in x_block_self_attn_layers if not 0 <= i < depth]
        if bad_layers:
            raise ValueError(f"x_block_self_attn_layers {bad_layers} are not block indices 0..{depth - 1}")
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.pos_embed_max_size = pos_embed_max_size
        self.context_dim = context_dim
        self.register_length = register_length

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)  # any size: positions are cropped
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size) if adm_in_channels is not None else None
        self.context_embedder = nn.Linear(context_dim, hidden_size) if context_dim is not None else nn.Identity()
        if register_length > 0:
            self.register = nn.Parameter(torch.randn(1, register_length, hidden_size))
        # A persistent buffer, as in the official code: checkpoints carry it.
        self.register_buffer("pos_embed", torch.zeros(1, pos_embed_max_size ** 2, hidden_size))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=i == depth - 1,
                       x_block_self_attn=i in x_block_self_attn_layers)
            for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's recipe (SD3's training code is not public; the official inference
        code initialises nothing, since every tensor comes from the checkpoint):
        Xavier-uniform linear layers and patch projection with zero biases,
        N(0, 0.02) timestep MLP, 2-D sin-cos positions, and zero adaLN
        modulations and final linear layer, so that every block starts as the
        identity on the image stream and the model outputs exactly 0.
        Register tokens stay N(0, 1) and RMSNorm gains 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.pos_embed_max_size).unsqueeze(0))
        for block in self.joint_blocks:
            zero_init(block.context_block.adaLN_modulation[1])
            zero_init(block.x_block.adaLN_modulation[1])
        zero_init(self.final_layer.adaLN_modulation[1])
        zero_init(self.final_layer.linear)

    def cropped_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings ``(1, height * width, D)`` for a ``height x width`` patch
        grid: the centre of the stored ``pos_embed_max_size`` square."""
        return cropped_pos_embed(self.pos_embed, self.pos_embed_max_size, height, width)

    def _check_inputs(self, x, t, y, context) -> None:
        check_float_input("MMDiT", "x", x, ndim=4, layout="(B, C, H, W)", like=self.x_embedder.proj.weight)
        check_timesteps("MMDiT", "t", t)
        for name, value in (("y", y), ("context", context)):
            if value is not None:
                check_float_input("MMDiT", name, value, like=self.x_embedder.proj.weight)
        B, _, H, W = x.shape
        p, max_side = self.patch_size, self.patch_size * self.pos_embed_max_size
        if H % p or W % p:
            raise ValueError(f"MMDiT: image size {H}x{W} is not divisible by the patch size {p}")
        if H > max_side or W > max_side:
            raise ValueError(f"MMDiT: image size {H}x{W} is too large: with patch size {p} and "
                             f"pos_embed_max_size {self.pos_embed_max_size} the largest is {max_side}x{max_side}")
        if t.shape != (B,):
            raise ValueError(f"MMDiT expects one timestep per image, t of shape ({B},), got {tuple(t.shape)}")
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this MMDiT was built without adm_in_channels, so it takes no y")
        else:
            width = self.y_embedder.mlp[0].in_features
            if y is None or y.shape != (B, width):
                got = None if y is None else tuple(y.shape)
                raise ValueError(f"MMDiT expects the pooled embedding y of shape ({B}, {width}), got {got}")
        if context is None:
            if self.context_dim is not None:
                raise ValueError(f"this MMDiT needs context of shape (B, L_c, {self.context_dim})")
            return
        width = self.hidden_size if self.context_dim is None else self.context_dim
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != width:
            raise ValueError(f"MMDiT expects context of shape ({B}, L_c, {width}), got {tuple(context.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, skip_layers: Sequence[int] = ()) -> torch.Tensor:
        self._check_inputs(x, t, y, context)
        bad_layers = [i for i in skip_layers if not 0 <= i < len(self.joint_blocks)]
        if bad_layers:
            raise ValueError(f"skip_layers {bad_layers} are not block indices 0..{len(self.joint_blocks) - 1}")
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w)  # (B, h*w, D)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        if context is None:  # no text: the context stream is the registers alone (maybe empty)
            context = x.new_zeros(B, 0, self.hidden_size)
        else:
            context = self.context_embedder(context)  # (B, L_c, D)
        if self.register_length > 0:
            context = torch.cat((self.register.expand(B, -1, -1), context), dim=1)
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:  # skip-layer guidance: this block is left out
                continue
            context, x = block(context, x, c)
        x = self.final_layer(x, c)  # (B, h*w, p*p*out_channels)
        return unpatchify(x, self.patch_size, self.out_channels, h, w)


# The book's small text-to-image model: 32x32 RGB shapes, captions embedded to 64
# wide tokens plus a 64 wide pooled vector; qk-norm as in SD3.5.
SMALL_CONFIG = dict(in_channels=3, hidden_size=128, depth=4, num_heads=4, pos_embed_max_size=16, patch_size=2,
                    adm_in_channels=64, context_dim=64, qk_norm="rms")
