"""Distillation: train a compressed or smaller student to follow its teacher."""
