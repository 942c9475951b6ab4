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


def compile_for(model: Any, n_classes: int, learning_rate: float, steps_per_execution: int = 1) -> None:
    """RMSprop and the seeds' loss for two or more classes. ``steps_per_execution`` > 1 runs
    that many batches per call into the compiled graph: the same updates in the same order,
    fewer round trips through Python (issue 29)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        loss="binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
