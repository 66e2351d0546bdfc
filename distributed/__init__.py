"""Ray-distributed data-parallel training of TensorFlow graph-mode models.

Importing the package puts the process in the project's one TF world
(:mod:`distributed.tfworld`): Keras 2 routing for ``tf.keras`` and
``tf.compat.v1.layers``, and TensorFlow's log level.
"""

from distributed import tfworld as _tfworld

_tfworld.enter()
