"""Datasets shipped with latent_hops (see WORLD_DATASET_CARD.md)."""
