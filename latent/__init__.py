"""Latent diffusion (KL-VAE, cross-attention U-Net, classifier-free guidance): not built yet.

It will reuse ddpm's schedules, objectives and samplers and the common/ plumbing.
"""
