"""Do two kernel paths compute the same training step? One step's gradients, saved, then compared.

    python -m benchmarks.kernel_paths --out native.npz --set train.task=simclr model.width=8
    ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.kernel_paths --out avx2.npz --set train.task=simclr model.width=8
    TF_ENABLE_ONEDNN_OPTS=0 python -m benchmarks.kernel_paths --out eigen.npz --set train.task=simclr model.width=8
    python -m benchmarks.kernel_paths --compare avx2.npz eigen.npz

The task's network (built through its seam, float32, in training mode) on fixed random images; the
"loss" is a fixed random linear function of its outputs, which sends a gradient through every layer.
--compare prints each variable's relative difference ||a - b|| / ||b||, largest first: float32's
summation order alone gives about 1e-6 to 1e-5; a kernel that computes something else gives far more.
"""

from __future__ import annotations

import argparse

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_paths", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="where to save this process's gradients (.npz)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="config overrides (KEY=VALUE)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.compare):
        parser.error("give --out (to measure) or --compare A B")
    return args


def gradients(overrides: list[str], images: int) -> dict[str, np.ndarray]:
    """The gradients of a fixed linear function of the task's network outputs on fixed random images."""
    import tensorflow as tf

    from resnet18.config import build_config
    from resnet18.tasks import task_of

    config = build_config(None, ["train.precision=float32", *overrides])
    model = task_of(config).build_network(config, 10, "float32")
    rng = np.random.default_rng(0)
    size = config.data.image_size
    pixels = tf.constant(rng.uniform(0, 255, (images, size, size, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        outputs = model(pixels, training=True)
        weights = tf.constant(rng.standard_normal(outputs.shape).astype(np.float32))
        loss = tf.reduce_sum(outputs * weights) / images
    found = tape.gradient(loss, model.trainable_variables)
    return {"_outputs": outputs.numpy(), **{v.path: g.numpy() for v, g in zip(model.trainable_variables, found)}}


def compare(first: str, second: str, shown: int = 12) -> list[tuple[float, str]]:
    """Each array's relative difference, largest first (printed)."""
    a, b = np.load(first), np.load(second)
    rows = sorted(((float(np.linalg.norm(a[key] - b[key]) / max(np.linalg.norm(b[key]), 1e-30)), key)
                   for key in a.files), reverse=True)
    for difference, key in rows[:shown]:
        print(f"{difference:9.2e}  {key.replace('__', '/')}")
    print(f"median {np.median([row[0] for row in rows]):.2e} over {len(rows)} arrays")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return
    found = gradients(args.overrides, args.images)
    np.savez(args.out, **{key.replace("/", "__"): value for key, value in found.items()})
    print(f"{args.out}: {len(found) - 1} gradients")


if __name__ == "__main__":
    main()
