"""Hyperparameter search with Ray Tune: the training job as a Tune trainable.

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from distributed.tune import trainable

    tuner = tune.Tuner(
        trainable("jobs/configs/digits_eval.yaml"),
        param_space={"optimizer.learning_rate": tune.grid_search([1e-3, 3e-3])},
        tune_config=tune.TuneConfig(metric="eval/accuracy", mode="max",
                                    scheduler=ASHAScheduler(max_t=5)))
    best = tuner.fit().get_best_result()
    best.metrics["storage"], best.metrics["run"], best.metrics["step"]

Each trial trains its own run (:mod:`.trial`) in its own placement group
(:mod:`.placement`); ``param_space`` keys are dotted config paths
(:mod:`.space`); a trial's Tune checkpoint names committed checkpoints
(:mod:`.pointer`); PBT's exploit starts a run from another's full checkpoint
(:mod:`.warmstart`).

``trainable`` and ``resources`` import Ray Tune when first used, so reading a
pointer (``jobs.restore --tune-checkpoint``) needs no Ray.
"""

from distributed.tune.pointer import CheckpointPointer, read_pointer

__all__ = ["CheckpointPointer", "read_pointer", "resources", "trainable"]


def __getattr__(name: str):
    if name == "trainable":
        from distributed.tune.trial import trainable
        return trainable
    if name == "resources":
        from distributed.tune.placement import resources
        return resources
    raise AttributeError(f"module 'distributed.tune' has no attribute {name!r}")
