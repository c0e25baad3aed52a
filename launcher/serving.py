"""The requests a client sends to a model exported for TF Serving (`python -m launcher.export`).

    body = rest_request_body(images)      # POST to http://HOST:8501/v1/models/resnet18:predict
    request = grpc_predict_request(images)  # PredictionService.Predict on HOST:8500

`images` are uint8 [N, 32, 32, 3] RGB; the SavedModel standardises them itself.
docker/SERVING.md shows the server side.
"""

from __future__ import annotations

import json


def rest_request_body(images) -> str:
    """The JSON a client POSTs to TF Serving's REST API (…/v1/models/resnet18:predict)."""
    return json.dumps({"signature_name": "serving_default", "instances": [image.tolist() for image in images]})


def grpc_predict_request(images, model_name: str = "resnet18"):
    """The PredictRequest a gRPC client sends to TF Serving (port 8500), via tensorflow-serving-api."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.uint8))
    return request
