"""BitStack (Wang et al. 2024): any-size compression by stacked ~1-bit residual blocks."""
