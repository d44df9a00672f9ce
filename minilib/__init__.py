"""minilib: the code behind "How Modern Image Generators Work".

One concept per file, in the order the book introduces them:

| chapter | file | what it holds |
|---|---|---|
| 1 Images as tokens | ``patch_embed.py`` | ``PatchEmbed``, ``patchify``/``unpatchify``, 2-D sin-cos and cropped positions |
| 2 Timestep embedding | ``timestep.py`` | ``timestep_embedding``, ``TimestepEmbedder``, ``LabelEmbedder`` |
| 3 adaLN modulation | ``adaln.py`` | ``modulate``, ``DiTBlock``, ``FinalLayer``, ``TinyDenoiser`` |
| 4 Latent autoencoders | ``autoencoder.py`` | ``AutoencoderKL``, ``DiagonalGaussian``, ``vae_loss`` |
| 5 Diffusion with a transformer | ``diffusion.py``, ``dit.py`` | DDPM/DDIM, schedules, guidance; ``DiT`` |
| 6 Flow matching, Euler sampling | ``flow.py`` | rectified flow, SD3's shifted sigmas, ``to_d``, ``sample_euler``, Heun |
| 7 MM-DiT | ``mmdit.py`` | joint attention (``block_mixing``), ``DismantledBlock``, ``MMDiT`` |
| 3, 10 VAR | ``var.py`` | VAR's ``SelfAttention``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead`` |
| 3, 12 MAR's diffusion head | ``diffloss.py`` | ``SimpleMLPAdaLN`` and its ``ResBlock`` |

and the tools every chapter uses: ``budget.py`` (run budgets, device, seeds),
``datasets.py`` (shapes, digits, MNIST, CIFAR-10), ``training.py`` (training
loop, EMA, safe checkpoints), ``metrics.py`` (the oracle classifier and
Fréchet distance that score every chapter's samples), ``plotting.py``, ``show.py`` (``show_source``)
and ``zoo.py`` (every model configuration by name).
"""
