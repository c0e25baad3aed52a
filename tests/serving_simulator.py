"""What TF Serving does with a request, without a server: decode it and call the signature.

No TF Serving runs in CI; these stand in for the server side of docker/SERVING.md so the
exact client requests of launcher/serving.py are checked against the exported SavedModel.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import tensorflow as tf


def run_rest_request(signature: Callable, body: str) -> dict[str, Any]:
    """What TF Serving does with a REST `body`: stack the instances, call the signature."""
    request = json.loads(body)
    images = tf.constant(np.asarray(request["instances"], dtype=np.uint8))
    outputs = signature(images=images)
    return {name: value.numpy().tolist() for name, value in outputs.items()}


def run_grpc_request(signature: Callable, request) -> dict[str, Any]:
    """What TF Serving does with a PredictRequest: decode the tensors, call the signature."""
    inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
    return {name: value.numpy().tolist() for name, value in signature(**inputs).items()}
