"""kvscope."""
