"""Latent diffusion (Rombach et al. 2022) in JAX/Flax, in two stages.

Stage 1 (`autoencoder`, `vae_loss`, `lpips`, `vae_train`): a KL-regularised
autoencoder shaped like diffusers' AutoencoderKL. Stage 2 (`attention`, `unet`,
`text`, `conditions`, `guidance`, `train`, `sample`): ddpm's U-Net with spatial
transformers that cross-attend to a text or class context, trained on the
frozen autoencoder's latents with classifier-free guidance; sampling covers
text-to-image, image-to-image and inpainting with ddpm's samplers.
`main` runs either stage from the ml_collections files in `configs/`.
"""
