"""Tokenizers, preprocessing into Megatron indexed datasets, GPTDataset loaders, real assets."""
