"""VAR's multi-scale residual VQ-VAE (Tian et al., 2024, "Visual Autoregressive Modeling").

Chapter 9 of the book; chapter 10's VAR transformer predicts the tokens it makes.
An image ``(B, 3, H, W)`` is encoded to a feature map ``f`` of shape
``(B, Cvae, h, w)`` (``h = H / 16`` at full size) and quantised into a *pyramid*
of token maps ``r_1, ..., r_K`` of sides ``v_patch_nums = (1, 2, 3, 4, 5, 6, 8,
10, 13, 16)``: first one token for the whole image, then 2x2, ... up to 16x16.
Each scale quantises what the coarser ones have not yet explained (Algorithm 1 of
the VAR paper, Tian et al. 2024):

    f_hat = 0,  f_rest = f
    for k = 1..K:
        r_k  = nearest_code( area_down(f_rest, p_k) )                  (p_k x p_k indices)
        h_k  = phi_k( bicubic_up(lookup(r_k), h) )                     (back to h x w)
        f_hat = f_hat + h_k;   f_rest = f_rest - h_k
    x_hat = decoder(post_quant_conv(f_hat))

``phi_k`` (``Phi``) is a 3x3 conv blended with the identity, ``(1 - 0.5) h + 0.5
conv(h)``, which repairs the blur of up-sampling; the full model shares 4 of them
among the 10 scales (``PhiPartiallyShared``). Training uses VQ-VAE's losses on
``f_hat`` after every scale and the straight-through estimator (see
``minilib.quantize``).

For the transformer, ``img_to_idxBl`` gives the K index lists ``(B, p_k^2)``;
``idxBl_to_var_input`` builds the teacher-forcing input (the area-down-sampled
running ``f_hat`` at the next scale's size) and ``get_next_autoregressive_input``
does the same one scale at a time when sampling; ``fhat_to_img`` decodes.

Names follow the official code (``quantize.embedding``, ``quantize.quant_resi.qresi_ls``,
``quantize.ema_vocab_hit_SV``, ``quant_conv``, ``post_quant_conv``), and the
encoder and decoder are ``minilib.autoencoder``'s with VAR's settings (one fused
``qkv`` conv per attention block, ``z_channels`` outputs, attention at the lowest
resolution), so VAR's ``vae_ch160v4096z32.pth`` loads with ``strict=True``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import Decoder, Encoder
from .quantize import nearest_code
from .validation import check_float_input

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class Phi(nn.Conv2d):
    """VAR's residual refinement ``phi``: ``(B, C, h, w) -> (B, C, h, w)``,

        phi(h) = (1 - a) h + a conv3x3(h),    a = quant_resi (0.5 in VAR)

    Applied to every up-sampled code map before it is added to ``f_hat``. A conv
    subclass, so its weights are ``...qresi_ls.i.weight`` as in the checkpoints.
    """

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


def _ticks(K: int) -> np.ndarray:
    """Where ``K`` shared phis sit on [0, 1] (the code's argument name; in the book's notation ``n_phi``, since
    ``K`` counts scales). Scale ``k`` of ``K`` scales, at ``(k - 1) / (K - 1)``, picks the nearest."""
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def _nearest_tick(ticks: np.ndarray, at_from_0_to_1: float) -> int:
    if not 0.0 <= float(at_from_0_to_1) <= 1.0:
        raise ValueError(f"a phi is chosen by the scale's position in [0, 1] ((k - 1) / (K - 1)); got {at_from_0_to_1}")
    return int(np.argmin(np.abs(ticks - at_from_0_to_1)))


class PhiShared(nn.Module):
    """One ``phi`` for every scale: ``quant_resi[anything]`` returns it (``share_quant_resi=1``)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``n_phi`` phis shared by all ``K`` scales (VAR uses ``n_phi = share_quant_resi = 4`` for K = 10).

    ``quant_resi[(k - 1) / (K - 1)]`` returns the phi whose tick is nearest to scale k's
    relative position; the ticks are ``linspace(1/(3 n_phi), 1 - 1/(3 n_phi), n_phi)`` for n_phi = 4
    (0.083, 0.361, 0.639, 0.917), so VAR's scales k = 1..10 use phis
    0, 0, 1, 1, 1, 2, 2, 3, 3, 3.
    """

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = _ticks(len(qresi_ls))

    def index(self, at_from_0_to_1: float) -> int:
        """Which of the ``n_phi`` phis serves the scale at relative position ``at_from_0_to_1``."""
        return _nearest_tick(self.ticks, at_from_0_to_1)

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[self.index(at_from_0_to_1)]

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


class PhiNonShared(nn.ModuleList):
    """One phi per scale (``share_quant_resi=0``), indexed like ``PhiPartiallyShared``."""

    def __init__(self, qresi: list[nn.Module]):
        super().__init__(qresi)
        self.ticks = _ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(_nearest_tick(self.ticks, at_from_0_to_1))

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


class VectorQuantizer2(nn.Module):
    """VAR's multi-scale residual quantiser over feature maps ``(B, Cvae, h, w)``, ``h = w = v_patch_nums[-1]``.

    Args:
        vocab_size: V, codes in the one codebook shared by all scales (4096).
        Cvae: width of a code and of the feature map (32).
        using_znorm: nearest code by cosine similarity (l2-normalised lookup) instead of distance.
        beta: commitment weight.
        default_qresi_counts: number of phis when not shared (0: one per scale).
        v_patch_nums: sides ``p_1 < ... < p_K`` of the token maps; the last is ``h``.
        quant_resi: the blend ratio ``a`` of ``Phi`` (0: no phi at all).
        share_quant_resi: 0: one phi per scale, 1: one for all, n_phi > 1: n_phi shared phis.

    Attributes:
        embedding: the codebook, ``nn.Embedding(V, Cvae)``.
        quant_resi: the phis; ``quant_resi[(k - 1) / (K - 1)]`` is scale k's (k = 1..K).
        ema_vocab_hit_SV: buffer ``(K, V)``, moving average of code hits per scale (training only).
    """

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool = False, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = VAR_PATCH_NUMS,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        v_patch_nums = tuple(v_patch_nums)
        if len(v_patch_nums) < 2 or any(b <= a for a, b in zip(v_patch_nums, v_patch_nums[1:])) or v_patch_nums[0] < 1:
            raise ValueError(f"v_patch_nums must be at least two increasing positive sides, got {v_patch_nums}")
        if share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")
        self.vocab_size, self.Cvae, self.using_znorm, self.beta = vocab_size, Cvae, using_znorm, beta
        self.v_patch_nums = v_patch_nums
        self.quant_resi_ratio = quant_resi

        def phi() -> nn.Module:
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:      # non-shared: phi_1 .. phi_K for K scales
            self.quant_resi = PhiNonShared([phi() for _ in range(default_qresi_counts or len(v_patch_nums))])
        elif share_quant_resi == 1:    # fully shared: one phi
            self.quant_resi = PhiShared(phi())
        else:                          # partially shared: share_quant_resi phis for K scales
            self.quant_resi = PhiPartiallyShared(nn.ModuleList(phi() for _ in range(share_quant_resi)))

        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(v_patch_nums), vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(vocab_size, Cvae)

    @torch.no_grad()
    def eini(self, eini: float) -> None:
        """Re-initialise the codebook: truncated normal with std ``eini`` if ``eini > 0``, uniform
        in ``+-|eini| / V`` if ``eini < 0`` (``-1`` is VQGAN's init: codes start near 0), unchanged if 0."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight, std=eini)
        elif eini < 0:
            self.embedding.weight.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    def extra_repr(self) -> str:
        return (f"{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}  |  "
                f"S={len(self.v_patch_nums)}, quant_resi={self.quant_resi_ratio}")

    # ---- the pieces of one scale -------------------------------------------------------------
    def phi(self, si: int, SN: int | None = None) -> nn.Module:
        """Scale ``si``'s phi (of ``SN`` scales, default all): ``quant_resi[si / (SN - 1)]``."""
        SN = len(self.v_patch_nums) if SN is None else SN
        return self.quant_resi[si / (SN - 1)]

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Code indices ``(N,)`` for vectors ``(N, Cvae)``: the nearest code, or with ``using_znorm``
        the code of the most similar direction (largest cosine similarity, as the official code
        computes it: the argmax of unit vectors times unit codes, not a distance between them)."""
        codebook = self.embedding.weight.detach()
        if self.using_znorm:
            cosine_NV = F.normalize(z_NC, dim=-1) @ F.normalize(codebook.T, dim=0)  # (N, V)
            return cosine_NV.argmax(dim=1)
        return nearest_code(z_NC, codebook)

    def _check_f(self, f_BChw: torch.Tensor, who: str) -> None:
        if not isinstance(f_BChw, torch.Tensor) or f_BChw.ndim != 4 or f_BChw.shape[1] != self.Cvae:
            got = tuple(f_BChw.shape) if isinstance(f_BChw, torch.Tensor) else type(f_BChw).__name__
            raise ValueError(f"{who} expects a feature map (B, {self.Cvae}, h, w); got {got}")

    # ---- training ------------------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False
                ) -> tuple[torch.Tensor, list[float] | None, torch.Tensor]:
        """Quantise ``f`` over all scales (used to train the VQ-VAE).

        Args:
            f_BChw: ``(B, Cvae, h, w)`` with ``h = w = v_patch_nums[-1]``.
            ret_usages: also return, per scale, the percentage of codes whose moving
                hit count exceeds 8% of a uniform share.
        Returns:
            ``f_hat`` ``(B, Cvae, h, w)`` (value: the quantised map; gradient: the
            identity to ``f``), ``usages`` (list of K floats, or None), and the VQ loss

                (1 / K) sum_k [ beta * mse(sg[f_hat_k], f) + mse(f_hat_k, sg[f]) ]

            where ``f_hat_k`` is the running sum after scale k: every scale is pushed
            to explain the feature map, not only the last.
        """
        self._check_f(f_BChw, "VectorQuantizer2")
        B, C, H, W = f_BChw.shape
        if H != self.v_patch_nums[-1] or W != self.v_patch_nums[-1]:
            raise ValueError(f"VectorQuantizer2 expects h = w = v_patch_nums[-1] = {self.v_patch_nums[-1]}; "
                             f"got a {H}x{W} feature map")
        dtype = f_BChw.dtype
        # Distances and losses in float32, even under mixed precision (autocast has no meta device).
        no_autocast = nullcontext() if f_BChw.is_meta else torch.autocast(f_BChw.device.type, enabled=False)
        with no_autocast:
            f_BChw = f_BChw.float()
            f_no_grad = f_BChw.detach()
            f_rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f_rest)
            mean_vq_loss = f_BChw.new_zeros(())
            SN = len(self.v_patch_nums)
            for si, pn in enumerate(self.v_patch_nums):  # from small to large
                rest = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
                idx_N = self.nearest(rest.permute(0, 2, 3, 1).reshape(-1, C))
                h_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
                if si != SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
                h_BChw = self.phi(si, SN)(h_BChw.contiguous())
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                if self.training:
                    self._record_hits(si, idx_N)
                scale_loss = F.mse_loss(f_hat.detach(), f_BChw) * self.beta + F.mse_loss(f_hat, f_no_grad)
                mean_vq_loss = mean_vq_loss + scale_loss
            if self.training:
                self.record_hit += 1
            mean_vq_loss = mean_vq_loss * (1.0 / SN)  # times 1/K, as VAR rounds it
            f_hat = (f_hat.detach() - f_no_grad) + f_BChw   # straight-through: d f_hat / d f = identity
        usages = None
        if ret_usages:
            margin = B * H * W / self.vocab_size * 0.08
            usages = [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(SN)]
        return f_hat.to(dtype), usages, mean_vq_loss

    @torch.no_grad()
    def _record_hits(self, si: int, idx_N: torch.Tensor) -> None:
        # The official code updates this only under torch.distributed (summing over GPUs)
        # and counts updates per scale rather than per step; on one device we count here.
        hit_V = idx_N.bincount(minlength=self.vocab_size).float()
        if self.record_hit == 0:
            self.ema_vocab_hit_SV[si].copy_(hit_V)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV[si].mul_(0.9).add_(hit_V.mul(0.1))
        else:
            self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V.mul(0.01))

    # ---- tokens <-> f_hat --------------------------------------------------------------------
    def embed_to_fhat(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """Code maps of every scale ``[(B, Cvae, p_k, p_k)]`` -> ``f_hat`` after each scale.

        With ``all_to_max_scale`` (what training and sampling use) every code map is
        up-sampled to ``h x w`` and passed through its phi before it is added; the
        result is a list of K maps ``(B, Cvae, h, w)``, or only the last one with
        ``last_one``. Without it, ``f_hat`` itself is up-sampled from scale to scale
        and returned at each scale's size (an experiment in the official code, not
        how VAR works).
        """
        SN = len(self.v_patch_nums)
        if len(ms_h_BChw) != SN:
            raise ValueError(f"embed_to_fhat expects {SN} code maps (one per scale), got {len(ms_h_BChw)}")
        B = ms_h_BChw[0].shape[0]
        H = W = self.v_patch_nums[-1]
        ls_f_hat_BChw = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                h_BChw = ms_h_BChw[si]
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
                f_hat = f_hat + self.phi(si, SN)(h_BChw)
                ls_f_hat_BChw.append(f_hat)
        else:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, self.v_patch_nums[0], self.v_patch_nums[0],
                                           dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat = f_hat + self.phi(si, SN)(ms_h_BChw[si])
                ls_f_hat_BChw.append(f_hat)
        return ls_f_hat_BChw[-1] if last_one else ls_f_hat_BChw

    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Sequence[int | tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Quantise ``f`` ``(B, Cvae, h, w)`` scale by scale (Algorithm 1 of the paper).

        Returns one entry per scale: the indices ``(B, p_k^2)`` (row-major over the
        ``p_k x p_k`` map), or with ``to_fhat`` the running ``f_hat`` ``(B, Cvae, h, w)``
        after that scale. ``v_patch_nums`` may override the scales (ints or
        ``(ph, pw)`` pairs); the last one must be ``(h, w)``.
        """
        self._check_f(f_BChw, "f_to_idxBl_or_fhat")
        B, C, H, W = f_BChw.shape
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(f"the last scale {patch_hws[-1]} must be the feature map's size ({H}, {W}); "
                             f"images must be {self.v_patch_nums[-1]} x the encoder's downsampling factor")
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        out: list[torch.Tensor] = []
        SN = len(patch_hws)
        for si, (ph, pw) in enumerate(patch_hws):
            rest = F.interpolate(f_rest, size=(ph, pw), mode="area") if si != SN - 1 else f_rest
            idx_N = self.nearest(rest.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            if si != SN - 1:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
            h_BChw = self.phi(si, SN)(h_BChw.contiguous())
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    def _check_idx_Bl(self, ms_idx_Bl: list[torch.Tensor], count: int, who: str) -> None:
        if not isinstance(ms_idx_Bl, (list, tuple)) or len(ms_idx_Bl) < count:
            raise ValueError(f"{who} expects a list of at least {count} index tensors (B, p_k^2), one per scale "
                             f"of {self.v_patch_nums}; got {type(ms_idx_Bl).__name__} of "
                             f"{len(ms_idx_Bl) if isinstance(ms_idx_Bl, (list, tuple)) else '?'}")
        for si in range(count):
            idx, pn = ms_idx_Bl[si], self.v_patch_nums[si]
            if idx.ndim != 2 or idx.shape[1] != pn * pn or idx.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"{who}: scale {si} needs integer indices (B, {pn * pn}); "
                                 f"got {tuple(idx.shape)} of dtype {idx.dtype}")

    # ---- for the VAR transformer ----------------------------------------------------------------
    def idxBl_to_var_input(self, gt_ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor | None:
        """Teacher-forcing input of the VAR transformer, ``(B, L - p_1^2, Cvae)``.

        From the ground-truth indices of all K scales ``[(B, p_k^2)]``: after scale
        k (k < K) the running ``f_hat`` (up-sampled codes through their phis) is
        area-down-sampled to the size of scale k+1 and flattened; the K - 1 pieces are
        concatenated. The transformer sees these at the positions of scales 2..K (the
        first scale's position holds the class token instead), so it predicts
        ``r_{k+1}`` from everything known after scale k. float32. None for one scale.
        """
        self._check_idx_Bl(gt_ms_idx_Bl, len(self.v_patch_nums) - 1, "idxBl_to_var_input")
        next_scales = []
        B, C = gt_ms_idx_Bl[0].shape[0], self.Cvae
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=torch.float32)
        pn_next = self.v_patch_nums[0]
        for si in range(SN - 1):
            h_BChw = F.interpolate(self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn_next, pn_next),
                                   size=(H, W), mode="bicubic")
            f_hat = f_hat + self.phi(si, SN)(h_BChw)
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step: add scale ``si``'s codes ``h_BChw`` ``(B, Cvae, p_si, p_si)`` to ``f_hat``.

        ``f_hat`` ``(B, Cvae, h, w)`` is updated in place and returned together with the
        next scale's input, ``f_hat`` area-down-sampled to ``p_{si+1}`` (at the last
        scale, ``f_hat`` itself). Repeating this for si = 0..K-2 gives exactly the
        pieces of ``idxBl_to_var_input``.
        """
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            h = self.phi(si, SN)(F.interpolate(h_BChw, size=(HW, HW), mode="bicubic"))  # conv after upsample
            f_hat.add_(h)
            pn = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(self.phi(si, SN)(h_BChw))
        return f_hat, f_hat


class VQVAE(nn.Module):
    """VAR's VQ-VAE: ``encoder -> quant_conv -> VectorQuantizer2 -> post_quant_conv -> decoder``.

    Images are ``(B, in_channels, H, W)`` in ``[-1, 1]`` with ``H = W = v_patch_nums[-1] * f``,
    ``f = 2^(len(ch_mult) - 1)`` (256 px and f = 16 at full size).

    Args:
        vocab_size, z_channels (= Cvae), beta, using_znorm, quant_resi,
            share_quant_resi, default_qresi_counts, v_patch_nums: see ``VectorQuantizer2``.
        ch, ch_mult, num_res_blocks: the autoencoder widths (VAR: 160, (1, 1, 2, 2, 4), 2),
            as in ``minilib.autoencoder``; attention in the last encoder and decoder
            level and in both middles.
        quant_conv_ks: kernel of ``quant_conv`` and ``post_quant_conv`` (z -> z convs).
        test_mode: freeze it as VAR does when it trains the transformer: ``eval()``
            and ``requires_grad=False`` on every parameter.
        in_channels: image channels (3).
        norm_groups: GroupNorm groups (32 in VAR; fewer for narrow small models).

    Attributes:
        encoder, decoder, quantize, quant_conv, post_quant_conv: the official submodules.
        V, vocab_size, Cvae, downsample: codebook size, code width and the factor f.
    """

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 128, beta: float = 0.25,
                 using_znorm: bool = False, quant_conv_ks: int = 3, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence[int] = VAR_PATCH_NUMS, test_mode: bool = False,
                 ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, in_channels: int = 3,
                 norm_groups: int = 32):
        super().__init__()
        self.test_mode = test_mode
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.in_channels = in_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        v_patch_nums = tuple(v_patch_nums)
        # VAR attends at the lowest resolution; in the autoencoder's terms that is the
        # last token map's side in an image of v_patch_nums[-1] * f pixels.
        levels = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                      resolution=v_patch_nums[-1] * self.downsample, attn_resolutions=(v_patch_nums[-1],),
                      norm_groups=norm_groups, fused_qkv=True)
        self.encoder = Encoder(in_channels=in_channels, double_z=False, **levels)
        self.decoder = Decoder(out_channels=in_channels, **levels)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, using_znorm, beta, default_qresi_counts,
                                         v_patch_nums, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        if test_mode:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(False)

    @property
    def image_size(self) -> int:
        """The side of the images the token pyramid fits: ``v_patch_nums[-1] * f``."""
        return self.quantize.v_patch_nums[-1] * self.downsample

    def _check_images(self, x: torch.Tensor, who: str, name: str = "x") -> None:
        size = self.image_size
        check_float_input(who, name, x, ndim=4, layout="(B, C, H, W)", like=self.quant_conv.weight)
        if x.shape[1] != self.in_channels or x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"{who} expects images (B, {self.in_channels}, {size}, {size}) in [-1, 1] as {name}; "
                             f"got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> the continuous feature map ``f`` ``(B, Cvae, H/f, W/f)``."""
        self._check_images(x, "VQVAE.encode")
        return self.quant_conv(self.encoder(x))

    def forward(self, inp: torch.Tensor, ret_usages: bool = False
                ) -> tuple[torch.Tensor, list[float] | None, torch.Tensor]:
        """Training pass: ``(reconstruction (B, 3, H, W), usages per scale or None, vq_loss)``.

        The reconstruction is not clamped (the training loss sees the raw output).
        """
        self._check_images(inp, "VQVAE")
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``f_hat`` ``(B, Cvae, h, w)`` -> images ``(B, 3, h f, w f)`` clamped to ``[-1, 1]``."""
        self.quantize._check_f(f_hat, "fhat_to_img")
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor,
                     v_patch_nums: Sequence[int | tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Images -> the token pyramid: K index tensors ``(B, p_k^2)``, coarse to fine."""
        self._check_images(inp_img_no_grad, "VQVAE.img_to_idxBl", name="inp_img_no_grad")
        f = self.encode(inp_img_no_grad)
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor], same_shape: bool = True, last_one: bool = False
                     ) -> list[torch.Tensor] | torch.Tensor:
        """The token pyramid ``[(B, p_k^2)]`` -> the image decoded after every scale (list of K
        ``(B, 3, H, W)``), or only the final image with ``last_one``; in ``[-1, 1]``."""
        self.quantize._check_idx_Bl(ms_idx_Bl, len(self.quantize.v_patch_nums), "idxBl_to_img")
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool, last_one: bool = False
                     ) -> list[torch.Tensor] | torch.Tensor:
        """Code maps ``[(B, Cvae, p_k, p_k)]`` -> decoded images (see ``VectorQuantizer2.embed_to_fhat``)."""
        if last_one:
            return self.fhat_to_img(self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale, last_one=True))
        return [self.fhat_to_img(f_hat) for f_hat in self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale)]

    @torch.no_grad()
    def img_to_reconstructed_img(self, x: torch.Tensor,
                                 v_patch_nums: Sequence[int | tuple[int, int]] | None = None,
                                 last_one: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """Images -> their reconstruction after every scale (list of K ``(B, 3, H, W)``), or the
        final one with ``last_one``; in ``[-1, 1]``."""
        f = self.encode(x)
        ls_f_hat_BChw = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(ls_f_hat_BChw[-1])
        return [self.fhat_to_img(f_hat) for f_hat in ls_f_hat_BChw]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a usage buffer saved with another number of scales is ignored."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = {**state_dict, key: self.quantize.ema_vocab_hit_SV}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
