"""A tiny BERT sequence classifier from google-research/bert's own code.

The model is ``modeling.BertModel`` (vendored unmodified in ``google_bert/``,
loaded by :mod:`tests.thirdparty.bert_shim`) with the classification head of
BERT's ``run_classifier.create_model`` (its pooled output, ``output_weights``
and ``output_bias``, dropout 0.1 in training); the optimizer is BERT's own
``optimization.AdamWeightDecayOptimizer``. Everything here is glue to the
framework's contract (:mod:`distributed.model`):

* :func:`model_fn` -- ``model_fn(features, labels, mode, params)``;
* :func:`tokens_input_fn` / :func:`tokens_eval_input_fn` -- a generated task;
* :func:`optimizer_fn` -- ``optimizer: tests.thirdparty.bert_classifier:optimizer_fn``.

BERT's optimizer ignores ``apply_gradients``' ``global_step`` (BERT's own
``create_optimizer`` adds ``global_step.assign(global_step + 1)`` to the train
op by hand), so :func:`optimizer_fn` wraps it in
``distributed.train.optimizers.advancing_global_step``;
:func:`unwrapped_optimizer_fn` returns it bare, which the framework refuses.

The task (generated in code, deterministic, nothing downloaded): sequences of
``SEQ_LENGTH`` token ids, a ``[CLS]`` id first, then a random number of ids
from ``[FIRST_WORD, VOCAB_SIZE)`` and padding; the label says whether more of
them are "low" ids (below the middle of the word range) than "high" ones.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from distributed.model import EVAL, PREDICT, TRAIN, ModelSpec, check_mode
from tests.thirdparty import bert_shim

VOCAB_SIZE = 100
SEQ_LENGTH = 16
NUM_LABELS = 2
PAD, CLS = 0, 1
FIRST_WORD = 4  # 2, 3 are unused ([SEP], [MASK] in BERT's vocabularies)
MIDDLE = (FIRST_WORD + VOCAB_SIZE) // 2
EVAL_EXAMPLES = 256
FEATURES = ("input_ids", "input_mask", "segment_ids")

CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 32,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
}
"""A tiny ``BertConfig`` (``model_params["bert"]`` overrides its keys)."""


# ---------------------------------------------------------------- inputs ---

def token_arrays(count: int, seed: int, stream: int) -> tuple[dict[str, np.ndarray],
                                                              np.ndarray]:
    """``count`` generated examples: ``({"input_ids", "input_mask",
    "segment_ids"}: int32 [count, SEQ_LENGTH], labels int64 [count])``.

    The same ``(seed, stream)`` gives the same examples; streams differ.
    """
    rng = np.random.default_rng([seed, stream])
    lengths = rng.integers(4, SEQ_LENGTH + 1, size=count)
    words = rng.integers(FIRST_WORD, VOCAB_SIZE, size=(count, SEQ_LENGTH))
    positions = np.arange(SEQ_LENGTH)[None, :]
    mask = (positions < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, words, PAD).astype(np.int32)
    ids[:, 0] = CLS
    body = (positions > 0) & (mask == 1)
    low = np.sum(body & (ids < MIDDLE), axis=1)
    high = np.sum(body & (ids >= MIDDLE), axis=1)
    labels = (low > high).astype(np.int64)
    # Second "segment" from the middle of each sequence on, as in sentence pairs.
    segments = ((positions >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
    return {"input_ids": ids, "input_mask": mask, "segment_ids": segments}, labels


def tokens_input_fn(worker_index: int, num_workers: int, batch_size: int,
                    params: Mapping[str, Any]) -> Iterator:
    """Yields fresh generated batches forever; each worker its own stream."""
    seed = int((params or {}).get("seed", 0))
    stream = 1000 + worker_index  # the eval set is stream 0

    def batches():
        rng_step = 0
        while True:
            yield token_arrays(batch_size, seed, stream * 1_000_000 + rng_step)
            rng_step += 1

    return batches()


def tokens_eval_input_fn(worker_index: int, num_workers: int, batch_size: int,
                         params: Mapping[str, Any]) -> Iterator:
    """One pass over ``EVAL_EXAMPLES`` held-out examples (stream 0)."""
    features, labels = token_arrays(EVAL_EXAMPLES, int((params or {}).get("seed", 0)), 0)
    for start in range(worker_index * batch_size, EVAL_EXAMPLES,
                       num_workers * batch_size):
        part = slice(start, start + batch_size)
        yield {k: v[part] for k, v in features.items()}, labels[part]


# ----------------------------------------------------------------- model ---

def bert_config(params: Mapping[str, Any] | None = None):
    """The ``modeling.BertConfig`` of :data:`CONFIG` with ``params["bert"]``."""
    overrides = dict((params or {}).get("bert", {}))
    return bert_shim.modeling().BertConfig(**{**CONFIG, **overrides})


def classifier(features: Mapping[str, Any], is_training: bool,
               params: Mapping[str, Any] | None = None) -> tf.Tensor:
    """BERT plus ``run_classifier.create_model``'s head: the logits.

    Builds ``bert/...`` (``modeling.BertModel``) and ``output_weights``,
    ``output_bias`` at the graph's root, as BERT's fine-tuning code does; so a
    stock ``Saver`` of a graph built by this function restores a checkpoint
    of it (the test's reference graph is built exactly so).
    """
    modeling = bert_shim.modeling()
    model = modeling.BertModel(
        config=bert_config(params), is_training=is_training,
        input_ids=features["input_ids"], input_mask=features["input_mask"],
        token_type_ids=features["segment_ids"], use_one_hot_embeddings=False)
    output_layer = model.get_pooled_output()
    hidden_size = int(output_layer.shape[-1])
    output_weights = tf.compat.v1.get_variable(
        "output_weights", [NUM_LABELS, hidden_size],
        initializer=tf.compat.v1.truncated_normal_initializer(stddev=0.02))
    output_bias = tf.compat.v1.get_variable(
        "output_bias", [NUM_LABELS], initializer=tf.compat.v1.zeros_initializer())
    with tf.compat.v1.variable_scope("loss"):
        if is_training:
            output_layer = tf.nn.dropout(output_layer, rate=0.1)
        logits = tf.matmul(output_layer, output_weights, transpose_b=True)
        return tf.nn.bias_add(logits, output_bias)


def model_fn(features: Mapping[str, tf.Tensor], labels: Any, mode: str,
             params: Mapping[str, Any]) -> ModelSpec:
    """The framework's model function: :func:`classifier`, cross-entropy,
    ``logits``/``probabilities``/``classes`` and eval ``accuracy``."""
    check_mode(mode, labels)
    logits = classifier(features, mode == TRAIN, params)
    predictions = {
        "logits": logits,
        "probabilities": tf.nn.softmax(logits, axis=-1, name="probabilities"),
        "classes": tf.argmax(logits, axis=-1, name="classes"),
    }
    if mode == PREDICT:
        return ModelSpec(predictions=predictions)
    labels = tf.cast(labels, tf.int64)
    one_hot = tf.one_hot(labels, depth=NUM_LABELS, dtype=tf.float32)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    loss = tf.reduce_mean(-tf.reduce_sum(one_hot * log_probs, axis=-1), name="loss")
    eval_metrics = {}
    if mode == EVAL:
        eval_metrics["accuracy"] = tf.compat.v1.metrics.accuracy(
            labels, predictions["classes"])
    return ModelSpec(loss=loss, predictions=predictions, eval_metrics=eval_metrics)


# ------------------------------------------------------------- optimizer ---

def bert_optimizer(learning_rate: Any):
    """BERT's ``AdamWeightDecayOptimizer`` as ``create_optimizer`` makes it."""
    return bert_shim.optimization().AdamWeightDecayOptimizer(
        learning_rate=learning_rate, weight_decay_rate=0.01, beta_1=0.9,
        beta_2=0.999, epsilon=1e-6,
        exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"])


def optimizer_fn(learning_rate: Any, params: Mapping[str, Any]):
    """``optimizer: tests.thirdparty.bert_classifier:optimizer_fn``: BERT's
    optimizer, made to advance ``global_step`` as the framework requires."""
    from distributed.train.optimizers import advancing_global_step
    return advancing_global_step(bert_optimizer(learning_rate))


def unwrapped_optimizer_fn(learning_rate: Any, params: Mapping[str, Any]):
    """BERT's optimizer as it is: it never advances ``global_step``."""
    return bert_optimizer(learning_rate)
