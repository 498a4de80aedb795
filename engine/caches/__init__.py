"""Cache kinds beyond plain attention: layout detection, adopted mlx-lm caches, RoPE probe, support table."""
