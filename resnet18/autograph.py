"""Which Python AutoGraph rewrites before TensorFlow traces it: what a task brings, not ours.

tf.function and tf.data's `map` pass every Python function they trace through AutoGraph,
which reads its source and rewrites tensor-dependent `if`/`for`/`while` into graph control
flow. That costs about 0.1 s per function, 1.6 s of every training process's start (19
functions; 2 cores of AMD EPYC Zen 3), and in a test suite that starts hundreds of processes
it adds up. Our graph code has no tensor-dependent Python control flow, so it is marked
`as_written` and traced exactly as written (the way JAX traces); a function it calls is then
not rewritten either. The seams are the exception: a task's objective and its augmentation go
through `converted`, so a contributor's `if tf.reduce_any(...)` works there as in any
tf.function (ours are marked `as_written` and pass through unchanged).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import tensorflow as tf

Function = TypeVar("Function", bound=Callable)

as_written = tf.autograph.experimental.do_not_convert
_UNSPECIFIED = tf.__internal__.autograph.control_status_ctx()  # read at import, outside any tf.function


def converted(function: Function) -> Function:
    """`function` as a default tf.function traces it, wherever it is called from: through AutoGraph,
    recursively, unless it is marked `as_written` (then it is returned as it is)."""
    # The status "unspecified" (that of code outside any tf.function) with conversion by default:
    # what tf.function's own default amounts to, also when called inside an `as_written` function.
    return tf.__internal__.autograph.tf_convert(function, _UNSPECIFIED, convert_by_default=True)

