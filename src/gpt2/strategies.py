"""Which devices compute: the tf.distribute strategy that a name (`--strategy`) picks.

Training runs on any of them (gpt2.train); generation spreads a batch's rows over the replicas
of one machine (gpt2.decode), and across machines each process takes its own share of the
samples (generate_unconditional.py --shard).
"""
import os

import tensorflow as tf

from .arguments import TRAINING_STRATEGIES, check_strategy, must
from .errors import GPT2Error


def distribution(strategy, names=TRAINING_STRATEGIES):
    """The tf.distribute.Strategy that `strategy` (one of `names`) picks, or `strategy` itself if it is one.

    auto: a TPU where one is found (TPU_NAME or COLAB_TPU_ADDR set, or TPU devices listed), else
    the machines that TF_CONFIG lists, else this machine's GPUs if it has several, else one
    device; of these, only those in `names`.
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    check_strategy(strategy, names)  # a name
    if not isinstance(strategy, str):  # nor a Strategy
        raise must("strategy", f"one of {', '.join(names)} or a tf.distribute.Strategy", strategy)
    if strategy == "auto":
        tpu = os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR") or tf.config.list_logical_devices("TPU")
        strategy = ("tpu" if tpu and "tpu" in names else
                    "multiworker" if os.environ.get("TF_CONFIG") and "multiworker" in names else
                    "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "one")
    if strategy == "one":
        return tf.distribute.get_strategy()
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if strategy == "multiworker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:  # "Collective ops must be configured at program startup"
            raise GPT2Error("the multiworker strategy must be made before TensorFlow computes anything in the "
                            "process: call gpt2.finetune first, or run finetune.py") from e
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:
        raise GPT2Error(f"no TPU found ({str(e).splitlines()[0]}): in Colab, choose a TPU runtime first") from e
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy):
    """Whether this process writes the run: the only one, or the chief (worker 0 if none is named chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type or isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())
