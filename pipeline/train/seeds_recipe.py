"""The seeds' Keras classifier recipe, shared by the MLP head and by finetune.

"The seeds" are the notebooks this project grew from (README): their head is Dense(256, relu),
Dropout(0.5), then Dense(1, sigmoid) or Dense(K, softmax), trained with RMSprop. One copy here,
so a head trained on cached features and a fine-tuned model are built and compiled alike.
Keras is imported inside each function: importing this module never loads TensorFlow.
"""

from __future__ import annotations

from typing import Any


def seeds_head(x: Any, n_classes: int, units: int = 256, dropout: float = 0.5) -> Any:
    """The seeds' classifier on a Keras tensor: Dense(units, relu), Dropout, then
    Dense(1, sigmoid) for two classes or Dense(K, softmax)."""
    import keras

    x = keras.layers.Dense(units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if n_classes == 2:
        return keras.layers.Dense(1, activation="sigmoid", name="head_out")(x)
    return keras.layers.Dense(n_classes, activation="softmax", name="head_out")(x)


def compile_for(
    model: Any, n_classes: int, learning_rate: float, steps_per_execution: int = 1, fused_update: bool = False
) -> None:
    """RMSprop and the seeds' loss for two or more classes. ``steps_per_execution`` > 1 runs
    that many batches per call into the compiled graph: the same updates in the same order,
    fewer round trips through Python (issue 29). ``fused_update``: each weight's RMSprop update
    as one XLA-fused pass (``fuse_rmsprop``)."""
    import keras

    optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate)
    model.compile(
        optimizer=fuse_rmsprop(optimizer) if fused_update else optimizer,
        loss="binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )


def fuse_rmsprop(optimizer: Any) -> Any:
    """``optimizer`` (a Keras RMSprop) with each weight's update compiled by XLA into one fused
    pass, on the TensorFlow backend (elsewhere unchanged). Issue 29: Keras runs RMSprop as about
    seven element-wise ops, each reading and writing the whole weight; the 8,192 x 256 flatten
    kernel (8 MB) made that about a third of an epoch at batch 64, one thread (BENCHMARKS.md
    section 8). Same formula, same order of updates: the losses agree to float rounding (a test
    checks it). The instance's ``update_step`` is replaced, not its class, so a saved model
    names a plain RMSprop and loads anywhere."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return optimizer
    import tensorflow as tf

    plain = optimizer.update_step
    compiled: dict[int, Any] = {}

    def update_step(gradient: Any, variable: Any, learning_rate: Any) -> Any:
        key = optimizer._get_variable_index(variable)
        if key not in compiled:  # one XLA cluster per weight (its shape), traced once

            def step(g: Any, lr: Any, v: Any = variable) -> Any:
                return plain(g, v, lr)

            compiled[key] = tf.function(step, jit_compile=True)
        return compiled[key](gradient, tf.convert_to_tensor(learning_rate))

    optimizer.update_step = update_step
    return optimizer
