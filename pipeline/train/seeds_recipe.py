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
    pass, on the TensorFlow backend with the seeds' plain RMSprop (no momentum, not centered;
    anything else is left unchanged). Issue 29: Keras runs RMSprop as about seven element-wise
    ops, each reading and writing the whole weight; the 8,192 x 256 flatten kernel (8 MB) made
    that about a third of an epoch at batch 64, one thread (BENCHMARKS.md section 8). Keras's
    formula in Keras's order (``_rmsprop_step``): the losses agree to float rounding (a test
    checks it). The compiled step takes the weight and its velocity as arguments, so one
    compilation per weight shape serves every fit in the process (a sweep worker fits several
    MLPs: each had paid its own XLA compilations, about 0.6 s a fit). The instance's
    ``update_step`` is replaced, not its class, so a saved model names a plain RMSprop."""
    import keras

    if keras.backend.backend() != "tensorflow" or optimizer.momentum > 0 or optimizer.centered:
        return optimizer
    import tensorflow as tf

    step, plain = _rmsprop_step(), optimizer.update_step
    rho, one_minus_rho, epsilon = optimizer.rho, 1 - optimizer.rho, optimizer.epsilon  # Python floats, as Keras

    def update_step(gradient: Any, variable: Any, learning_rate: Any) -> Any:
        velocity = optimizer._velocities[optimizer._get_variable_index(variable)]
        weight, state = (v if isinstance(v, tf.Variable) else v.value for v in (variable, velocity))  # tf.Variables
        if not (isinstance(weight, tf.Variable) and isinstance(state, tf.Variable)):
            return plain(gradient, variable, learning_rate)  # e.g. an autocast scope: Keras's own update
        dtype = weight.dtype
        return step(
            tf.cast(gradient, dtype),
            tf.cast(learning_rate, dtype),
            weight,
            state,
            tf.constant(rho, dtype),
            tf.constant(one_minus_rho, dtype),
            tf.constant(epsilon, dtype),
        )

    optimizer.update_step = update_step
    return optimizer


_STEP: Any = None


def _rmsprop_step() -> Any:
    """Keras's RMSprop update (``keras.optimizers.RMSprop.update_step``, no momentum, not
    centered) as one XLA-compiled function of the weight and its velocity, made once per
    process: traced once per weight shape and reused by every optimizer after."""
    global _STEP
    if _STEP is None:
        import tensorflow as tf

        def step(g: Any, lr: Any, variable: Any, velocity: Any, rho: Any, one_minus_rho: Any, epsilon: Any) -> None:
            velocity.assign(rho * velocity + one_minus_rho * tf.square(g))
            variable.assign_sub((lr * g) / tf.sqrt(velocity + epsilon))

        _STEP = tf.function(step, jit_compile=True)
    return _STEP
