"""Keras 3 adapter for psd_core: optimizers for the TensorFlow, JAX and PyTorch backends.

* :class:`PSD` — perturbed saddle-escape descent (:func:`psd_core.psd`).
* :class:`PerturbedAdam` — Adam with the PSD-style perturbation (:func:`psd_core.perturbed_adam`).
* :class:`SAM_SPS` — SAM/USAM with the stochastic Polyak step (:func:`psd_core.sam_sps`),
  trained by :class:`SAMModel` / :class:`SAMSequential` / the :class:`SAMTrainStep` mixin.

All are registered with ``keras.saving`` (package ``"psd_keras"``), so
``model.save("m.keras")`` / ``keras.models.load_model("m.keras")`` restore the
optimizer, its hyperparameters and its state. See ``docs/guides/keras.md``.

Importing this package registers the TensorFlow namespace bridge
(:mod:`psd_keras._tf_namespace`) with :func:`psd_core._array.register_namespace_hook`;
the hook never imports TensorFlow itself.
"""

from psd_core._array import register_namespace_hook


def _tf_hook(x):
    import sys

    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(x, tf.Tensor | tf.Variable):
        return None
    from . import _tf_namespace

    return _tf_namespace


register_namespace_hook(_tf_hook)

from .optimizers import PSD, SAM_SPS, PerturbedAdam  # noqa: E402
from .sam import SAMModel, SAMSequential, SAMTrainStep  # noqa: E402

__all__ = ["PSD", "SAM_SPS", "PerturbedAdam", "SAMModel", "SAMSequential", "SAMTrainStep"]
