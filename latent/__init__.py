"""Latent diffusion (Rombach et al. 2022) in JAX/Flax: one subpackage per product.

`vae/` (stage 1: the KL autoencoder shaped like diffusers' AutoencoderKL, its losses,
LPIPS, training, and the codec stage 2 reads), `ldm/` (stage 2: ddpm's U-Net with spatial
transformers cross-attending to a text or class context, classifier-free guidance, the one
guided sampler every product uses), `sd/` (Stable Diffusion pipeline folders in and out),
`controlnet/` (ControlNet and its control maps), `finetune/` (LoRA, DreamBooth, textual
inversion, hypernetworks, ControlNet training on a text LDM or a pipeline).
`main` runs any stage from the ml_collections files in `configs/`.
"""
