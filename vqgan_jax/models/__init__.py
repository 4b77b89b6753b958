"""Flax linen models: VQGAN (stage 1), discriminator, LPIPS, GPT (stage 2), InceptionV3."""
