"""Sharpness measures of a minimum: sharpness, non-uniformity, epsilon- and adaptive sharpness."""
