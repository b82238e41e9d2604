"""Optax adapter for psd_core (optax.GradientTransformation factories). Filled by the psd_optax issue."""
