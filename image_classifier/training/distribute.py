"""tf.distribute strategies for training: one GPU/CPU, all local devices, several machines, or a TPU.

Recipe, verified with TensorFlow 2.21 and Keras 3.15 (TF backend):

- Build *and compile* the model inside `Distribution.scope()`.
- Feed `fit` with `Distribution.dataset(build, per_replica_batch)`. With one worker that is `build`'s
  own dataset batched by the global batch (MirroredStrategy splits each batch between its replicas).
  With several workers it is `strategy.distribute_datasets_from_function`: each worker builds only
  its own shard of the indices, batched per replica, so nothing is read twice and nothing is rebatched.
  (A plain dataset given to `fit` under MultiWorkerMirroredStrategy is rebatched to
  global/replicas per step, yet Keras still counts steps by its cardinality: each epoch silently sees
  only part of the data.)
- With several workers the shard must `repeat()` and `fit` gets `steps_per_epoch` (and
  `validation_steps`) from `steps()`: shards of unequal size would otherwise give workers different
  step counts, and the collectives fail ("Collective instance ... expected ... data_type").
- `evaluate`/`predict` of a multi-worker model are collective: every worker must call them, or only
  the chief calls them on `local_copy(model)` (a chief-only call on the distributed model waits for
  the other workers, and fails only once they have exited).
- Saving reads local variable copies, no collectives: the chief alone may `save`/`save_weights`, and
  only the chief should write TensorBoard logs and checkpoints (workers would clobber one another).
- Trainable BatchNormalization layers keep per-worker moving statistics unless `synchronized=True`;
  frozen ones (as in `models.py`) are not affected.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..tf_env import import_keras

STRATEGIES = ("none", "mirrored", "multi-worker", "tpu")


@dataclass(frozen=True)
class Distribution:
    """A tf.distribute strategy with what the training code needs to know about this process."""

    name: str
    strategy: Any
    replicas: int
    workers: int
    worker_index: int
    is_chief: bool

    def scope(self):
        """Context manager: models, optimizers and metrics created inside are distributed."""
        return self.strategy.scope()

    def global_batch(self, per_replica: int) -> int:
        """Samples per training step over all replicas of all workers."""
        return per_replica * self.replicas

    def scaled_learning_rate(self, learning_rate: float) -> float:
        """Linear scaling rule: a global batch `replicas` times larger takes steps that much larger."""
        return learning_rate * self.replicas

    def batches(self, count: int, per_replica: int) -> int:
        """Global batches in one pass over `count` samples."""
        return max(1, math.ceil(count / self.global_batch(per_replica)))

    def steps(self, count: int, per_replica: int) -> int | None:
        """Steps for one pass over `count` samples; None (until the data ends) with one worker.

        Several workers need a fixed, equal number: their shards are repeated, so pass it to `fit`
        as `steps_per_epoch` (or `validation_steps`).
        """
        return None if self.workers == 1 else self.batches(count, per_replica)

    def shard(self, index_dataset):
        """This worker's share of a dataset of sample indices (all of it when there is one worker).

        Shard the indices before shuffling and reading, so each worker reads only its own rows.
        """
        if self.workers == 1:
            return index_dataset
        return index_dataset.shard(self.workers, self.worker_index)

    def dataset(self, build: Callable[[int, int, int], Any], per_replica: int):
        """What to give `fit`/`evaluate`: `build(batch_size, num_shards, shard_index)` makes the batches.

        `build` must shard its index dataset with `index_dataset.shard(num_shards, shard_index)`
        before shuffling, and, when `num_shards > 1`, `repeat()` it before batching (see `steps`).
        """
        if self.workers == 1:
            return build(self.global_batch(per_replica), 1, 0)
        global_batch = self.global_batch(per_replica)

        def per_worker(context):
            return build(
                context.get_per_replica_batch_size(global_batch),
                context.num_input_pipelines,
                context.input_pipeline_id,
            )

        return self.strategy.distribute_datasets_from_function(per_worker)

    def local_copy(self, model):
        """An undistributed copy of `model` (same weights, not compiled) for chief-only evaluate/predict.

        A multi-worker model's `predict`/`evaluate` are collective and would wait for the other workers.
        Call it outside `scope()`.
        """
        if self.workers == 1:
            return model
        keras = import_keras()
        copy = keras.models.clone_model(model)  # outside scope(): plain variables, default strategy
        copy.set_weights(model.get_weights())
        return copy


def check_strategy(name: str) -> None:
    """Fail fast, before preprocessing: an unknown strategy name, or multi-worker with a bad TF_CONFIG."""
    if name not in STRATEGIES:
        raise UserError(f"unknown distribution strategy {name!r}: use one of {', '.join(STRATEGIES)}")
    if name == "multi-worker":
        _tf_config()


def make_distribution(name: str) -> Distribution:
    """The strategy called `name` (one of STRATEGIES), created now: call this before any other TF work."""
    if name == "none":
        return _none()
    if name == "mirrored":
        return _mirrored()
    if name == "multi-worker":
        return _multi_worker()
    if name == "tpu":
        return _tpu()
    raise UserError(f"unknown distribution strategy {name!r}: use one of {', '.join(STRATEGIES)}")


def _none() -> Distribution:
    import_keras()
    import tensorflow as tf

    return Distribution("none", tf.distribute.get_strategy(), 1, 1, 0, True)


def _mirrored() -> Distribution:
    """All GPUs; without GPUs, all logical CPU devices (one, unless the CPU was split)."""
    import_keras()
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if not devices:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    return Distribution("mirrored", strategy, strategy.num_replicas_in_sync, 1, 0, True)


def _tf_config() -> tuple[int, int, bool]:
    """(workers, this worker's index, is chief) from $TF_CONFIG, with one-line errors for bad configs."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    hint = (
        'set TF_CONFIG to {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'
    )
    if not raw:
        raise UserError(f"multi-worker training needs the TF_CONFIG environment variable: {hint}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UserError(f"TF_CONFIG is not valid JSON ({error}): {hint}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError(f"TF_CONFIG needs both a 'cluster' and a 'task' object: {hint}")
    chiefs = cluster.get("chief") or []
    workers = cluster.get("worker") or []
    if not isinstance(chiefs, list) or not isinstance(workers, list) or not chiefs + workers:
        raise UserError(
            f"TF_CONFIG cluster must list 'worker' (and optionally one 'chief') addresses: {hint}"
        )
    if len(chiefs) > 1:
        raise UserError(f"TF_CONFIG cluster lists {len(chiefs)} chiefs: list at most one")
    extra = sorted(set(cluster) - {"chief", "worker"})
    if extra:
        raise UserError(
            f"TF_CONFIG cluster has {', '.join(extra)} jobs: multi-worker training uses only chief and worker"
        )
    kind, index = task.get("type"), task.get("index", 0)
    members = {"chief": chiefs, "worker": workers}.get(kind)
    if members is None:
        raise UserError(f"TF_CONFIG task type is {kind!r}: use 'worker' (or 'chief' if the cluster has one)")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(members):
        raise UserError(
            f"TF_CONFIG task index {index!r} is out of range: the cluster has {len(members)} {kind}(s)"
        )
    worker_index = index if kind == "chief" else len(chiefs) + index
    is_chief = kind == "chief" or (not chiefs and index == 0)
    return len(chiefs) + len(workers), worker_index, is_chief


@functools.cache
def _multi_worker_strategy_class():
    """MultiWorkerMirroredStrategy, with `reduce` fixed for what Keras 3's TF trainer passes it.

    Keras 3.15 calls `reduce` with a tuple of PerReplica values (symbolic build in `fit`) and with
    `axis=0` on scalar losses/metrics and on plain tensors; stock MultiWorkerMirroredStrategy fails on
    all three ("Attempt to convert a value (PerReplica...)", "Invalid reduction dimension 0 for input
    with 0 dimensions", "Cannot convert `input_tensor` to a `PerReplica` object"), see
    keras-team/keras#20585. Reducing each element, over replicas only for scalars, and passing plain
    tensors through is what Keras does for MirroredStrategy.
    """
    import_keras()
    import tensorflow as tf

    class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            if isinstance(value, tuple | list | dict):
                return tf.nest.map_structure(lambda item: self.reduce(reduce_op, item, axis), value)
            if not isinstance(value, tf.distribute.DistributedValues):
                return value  # e.g. a metric whose result() is its variable: as MirroredStrategy does
            if axis is not None and self.experimental_local_results(value)[0].shape.rank == 0:
                axis = None
            return super().reduce(reduce_op, value, axis)

    return KerasMultiWorkerMirroredStrategy


def _multi_worker() -> Distribution:
    """Synchronous training over the TF_CONFIG cluster; blocks until every worker has started."""
    workers, worker_index, is_chief = _tf_config()
    try:
        strategy = _multi_worker_strategy_class()()
    except (RuntimeError, ValueError) as error:
        raise UserError(
            f"cannot start multi-worker training ({error}): create the strategy before any other TensorFlow work"
        ) from None
    return Distribution(
        "multi-worker", strategy, strategy.num_replicas_in_sync, workers, worker_index, is_chief
    )


def _tpu() -> Distribution:
    """TPUStrategy on the TPU named by $TPU_NAME (or the local TPU VM)."""
    import_keras()
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"no TPU available ({message}): run on a TPU VM or set TPU_NAME, or choose another strategy"
        ) from None
    return Distribution("tpu", strategy, strategy.num_replicas_in_sync, 1, 0, True)
