"""Shared fixtures: tiny real TF graphs and temp storage. No mocks of TF."""

import os

# The project's one TF world (Keras 2 routing) before any test module imports
# TensorFlow: `from tensorflow.keras import ...` is bound at TF's import.
import distributed  # noqa: E402,F401
# One throwaway Ray auth token for the whole test session, set before Ray is
# imported: Ray caches the token on first use, so fixtures that start local Ray
# instances at different times must all see the same one. It also keeps tests
# from writing the user's ~/.ray/auth_token.
import secrets  # noqa: E402

os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import contextlib  # noqa: E402
import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@dataclasses.dataclass
class TinyModel:
    """A graph with two scopes, hand-written batch norm, EMA shadows and Adam."""

    graph: object
    sess: object
    x: object
    outputs: object  # predict-mode output (reads BN moving stats)
    train_op: object
    variables: list


def build_tiny_model(seed: int = 0, scale: int = 1) -> TinyModel:
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(seed)
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        with tf.compat.v1.variable_scope("tower"):
            w = tf.compat.v1.get_variable("dense/kernel", [8, 16 * scale])
            b = tf.compat.v1.get_variable("dense/bias", [16 * scale],
                                          initializer=tf.compat.v1.zeros_initializer())
            gamma = tf.compat.v1.get_variable("bn/gamma", [16 * scale],
                                              initializer=tf.compat.v1.ones_initializer())
            mean = tf.compat.v1.get_variable(
                "bn/moving_mean", [16 * scale], trainable=False,
                initializer=tf.compat.v1.zeros_initializer())
            var = tf.compat.v1.get_variable(
                "bn/moving_variance", [16 * scale], trainable=False,
                initializer=tf.compat.v1.ones_initializer())
        with tf.compat.v1.variable_scope("head"):
            k = tf.compat.v1.get_variable("kernel", [16 * scale, 3])
        h = tf.matmul(x, w) + b
        # train mode: batch statistics, moving averages updated.
        bm, bv = tf.nn.moments(h, [0])
        train_h = gamma * (h - bm) / tf.sqrt(bv + 1e-3)
        loss = tf.reduce_mean(tf.square(tf.matmul(tf.nn.relu(train_h), k)))
        updates = [mean.assign(0.9 * mean + 0.1 * bm), var.assign(0.9 * var + 0.1 * bv)]
        step = tf.compat.v1.train.get_or_create_global_step()
        with tf.control_dependencies(updates):
            train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=step)
        ema = tf.train.ExponentialMovingAverage(0.99)
        with tf.control_dependencies([train_op]):
            train_op = ema.apply([k])
        # predict mode: moving statistics and the EMA shadow of the head.
        pred_h = gamma * (h - mean) / tf.sqrt(var + 1e-3)
        outputs = tf.matmul(tf.nn.relu(pred_h), ema.average(k), name="logits")
        init = tf.compat.v1.global_variables_initializer()
    sess = tf.compat.v1.Session(graph=graph)
    sess.run(init)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        sess.run(train_op, {x: rng.normal(size=(32, 8)).astype(np.float32)})
    return TinyModel(graph, sess, x, outputs, train_op,
                     list(graph.get_collection("variables")))


@pytest.fixture
def tiny_model():
    model = build_tiny_model()
    yield model
    model.sess.close()


@pytest.fixture
def storage(tmp_path):
    path = tmp_path / "storage"
    path.mkdir()
    return str(path)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_ci() -> bool:
    """Whether the tests run under CI (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail_in_ci(reason: str) -> None:
    """Skips the calling test for a missing part, with ``reason``; under CI
    fails it instead, so a part the CI setup should provide cannot go missing
    unnoticed behind a skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this must not be skipped in CI)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def start_local_ray(num_cpus: int, **init_kwargs):
    """A fresh local Ray (never a cluster named by RAY_ADDRESS), shut down and
    the environment restored on exit. Auth uses the session token set above;
    RAY_AUTH_MODE is left for ray.init to set: setting it after ``import ray``
    cached the config leaves the driver without the token."""
    import ray
    stop_shared_ray()  # a Ray of the caller's own replaces the shared one
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO_ROOT,
                                       "TF_CPP_MIN_LOG_LEVEL": "2"}},
             **init_kwargs)
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def own_workers(monkeypatch):
    """The trainer starts :class:`~tests.helpers.fault_actors.PidRecordingWorker`
    actors instead of plain workers (it looks ``Worker`` up when it starts
    each group), so a test can signal its own run's worker processes."""
    from distributed.train import worker as worker_module
    from tests.helpers.fault_actors import PidRecordingWorker
    monkeypatch.setattr(worker_module, "Worker", PidRecordingWorker)


LOCAL_RAY_CPUS = 4
_shared_ray: list[contextlib.ExitStack] = []  # the running shared Ray, if any


def stop_shared_ray() -> None:
    """Shuts the shared Ray (:func:`local_ray`) down, if one runs: a module
    with a Ray of its own (another size, a multi-node cluster) needs this
    process without one."""
    while _shared_ray:
        _shared_ray.pop().close()


def _shared_ray_is_clean() -> bool:
    """Whether the shared Ray is as a fresh one: every CPU free (a test that
    leaked an actor would change the next module's resources); waits a few
    seconds for actors still exiting."""
    import time

    import ray
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if (ray.is_initialized()
                and ray.available_resources().get("CPU", 0.0) >= LOCAL_RAY_CPUS):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of ``LOCAL_RAY_CPUS`` CPUs (never a cluster named by
    RAY_ADDRESS), shared by the modules that use this fixture one after
    another: starting and stopping Ray costs seconds, a test's actors only a
    fraction of that. It is started anew when a module left actors behind,
    and stopped by a module that starts a Ray of its own and at the end."""
    if _shared_ray and not _shared_ray_is_clean():
        stop_shared_ray()
    if not _shared_ray:
        stack = contextlib.ExitStack()
        stack.enter_context(start_local_ray(LOCAL_RAY_CPUS, log_to_driver=False))
        _shared_ray.append(stack)
    yield


_modules_using_local_ray: set[str] = set()


def pytest_collection_modifyitems(session, config, items):
    _modules_using_local_ray.update(
        item.module.__name__ for item in items
        if "local_ray" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="module", autouse=True)
def _no_shared_ray_where_unused(request):
    """A module none of whose tests uses :func:`local_ray` runs without the
    shared Ray (its in-process runs start their own, as a user's would)."""
    if request.module.__name__ not in _modules_using_local_ray:
        stop_shared_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_ray_at_the_end():
    yield
    stop_shared_ray()
