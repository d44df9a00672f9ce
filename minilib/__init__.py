"""minilib: the code behind "How Modern Image Generators Work".

One concept per file, in the order the book introduces them:

| chapter | file | what it holds |
|---|---|---|
| 1 Images as tokens | ``patch_embed.py`` | ``PatchEmbed``, ``patchify``/``unpatchify``, 2-D sin-cos and cropped positions |
| 2 Timestep embedding | ``timestep.py`` | ``timestep_embedding``, ``TimestepEmbedder``, ``LabelEmbedder`` |
| 3 adaLN modulation | ``adaln.py`` | ``modulate``, ``DiTBlock``, ``FinalLayer``, ``TinyDenoiser`` |
| 4 Latent autoencoders | ``autoencoder.py`` | ``AutoencoderKL``, ``DiagonalGaussian``, ``vae_loss`` |
| 5 Diffusion with a transformer | ``diffusion.py``, ``dit.py`` | DDPM/DDIM, schedules, guidance; ``DiT`` |
| 5-6 Interlude | ``parameterisation.py`` | eps, x0, score and velocity; DDIM as Euler, DDPM as Euler-Maruyama |
| 6 Flow matching, Euler sampling | ``flow.py`` | rectified flow, SD3's shifted sigmas, ``to_d``, ``sample_euler``, Heun |
| 7 MM-DiT | ``mmdit.py`` | joint attention (``block_mixing``), ``DismantledBlock``, ``MMDiT`` |
| 8 Few-shot generation | ``fewshot.py`` | the sViT set encoder, the context-conditioned DiT, ``VFSDDPM`` |
| 9 Vector quantisation | ``quantize.py``, ``vqvae.py`` | nearest code, straight-through, ``ResidualVQ``; VAR's multi-scale ``VQVAE`` |
| 3, 10 VAR | ``var.py`` | ``AdaLNSelfAttn``, the block-causal mask, ``VAR`` with KV-cached sampling |
| 11 Masked autoregression | ``mar.py`` | random orders, masking, the MAE encoder/decoder, ``MAR.sample_tokens`` |
| 3, 12 The diffusion loss | ``diffloss.py`` | ``SimpleMLPAdaLN`` and ``DiffLoss`` (per-token diffusion) |
| 13 The real models | ``pretrained.py`` | ``from_pretrained``: official checkpoints, safely and strictly |

and the tools every chapter uses: ``budget.py`` (run budgets, device, seeds),
``datasets.py`` (shapes, digits, MNIST, CIFAR-10), ``training.py`` (training
loop, EMA, safe checkpoints), ``metrics.py`` (the oracle classifier and
Fréchet distance that score every chapter's samples), ``plotting.py``, ``show.py`` (``show_source``)
and ``zoo.py`` (every model configuration by name).
"""
