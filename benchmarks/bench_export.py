"""The exported classifier at iNat 2018 size: ONNX vs torch agreement and batch latency.

    python benchmarks/bench_export.py [--classes 8142] [--dim 512] [--batch 256] [--rounds 20]

A Candle head with random text features and prototypes (C classes, a tenth of them new) is
exported as `candle-dist export --format onnx` would (classifier.pt, then model.onnx from the
same scoring module, checked with onnxruntime); then one batch of image features goes through
the torch classifier and the onnxruntime session, alternately, `--rounds` times each, on the
threads torch and onnxruntime use by default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from report import write_section

from candle_dist.classifier import ExportedClassifier, export_classifier
from candle_dist.export import _write_onnx
from candle_dist.model.head import CandleHead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    num_base = args.classes - args.classes // 10
    text = torch.randn(args.classes, args.dim, generator=generator)
    protos = torch.randn(num_base, args.dim, generator=generator)
    head = CandleHead(text_features=text, visual_prototypes=protos, logit_scale=4.6052)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        export_classifier(head, Path(folder) / "classifier.pt", [f"c{i}" for i in range(len(text))])
        classifier = ExportedClassifier.load(Path(folder) / "classifier.pt")
        diff = _write_onnx(classifier, Path(folder) / "model.onnx")
        export_s = time.perf_counter() - started
        session = onnxruntime.InferenceSession(
            str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        features = torch.randn(args.batch, args.dim, generator=generator)
        array = features.numpy()
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        for _ in range(args.rounds):
            tick = time.perf_counter()
            want = classifier.scores(features)
            times["torch"].append(time.perf_counter() - tick)
            tick = time.perf_counter()
            (got,) = session.run(None, {"image_features": array})
            times["onnxruntime"].append(time.perf_counter() - tick)
        batch_diff = float(np.abs(got - want.numpy()).max())
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    labels = {"torch": "torch (ExportedClassifier.scores)", "onnxruntime": "onnxruntime (CPU)"}
    rows = [
        f"| {labels[name]} | {ms:.1f} | {args.batch / ms * 1000:,.0f} | "
        f"{ms / medians['torch']:.2f} |"
        for name, ms in medians.items()
    ]
    body = f"""A Candle head with random class inputs (C = {args.classes:,}, {args.classes // 10:,}
of them new, D = {args.dim}), exported to classifier.pt and model.onnx ({export_s:.1f} s for
both, the onnxruntime check included); one batch of {args.batch} image features through each,
{args.rounds} alternating rounds, medians. Max |onnxruntime - torch| on the scores (s = 100
included): {diff:.2e} on the export's check batch, {batch_diff:.2e} on the timed batch.

| runtime | median ms per batch | images/s | time ratio to torch |
| --- | --- | --- | --- |
""" + "\n".join(rows)
    print(body)
    write_section("export", "Exported classifier: ONNX vs torch at iNat 2018 size", body)


if __name__ == "__main__":
    main()
