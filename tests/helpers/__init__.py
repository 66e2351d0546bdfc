"""What the test modules share that is not a test: model, input and optimizer
functions that configs and Ray actors import by dotted path
(``tests.helpers.state_models:counter_model_fn``), ways to drive training,
local servers, and the digits runs several modules check. Test modules import
from here and from ``tests.conftest``, never from one another, so a module
runs, and moves, on its own.

Importing the package enters the project's one TF world first: a helper that
runs outside pytest (``python -m tests.helpers.crash_writer``, ``scripts/``,
a Ray worker) sees the same TensorFlow as the tests.
"""

import distributed  # noqa: F401
