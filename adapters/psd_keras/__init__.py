"""Keras 3 adapter for psd_core (keras.optimizers.Optimizer subclasses). Filled by the psd_keras issue."""
