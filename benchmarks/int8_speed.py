"""INT8 vs fp32 ONNX Runtime speed on this CPU: random-init ResNet50 at 224², batch 8, best of 3,
1 and 2 threads; INT8 as exported now (float head, weight bits by CPU) vs 0.1's settings.

    python benchmarks/int8_speed.py [WORKDIR]
"""
import os
import sys
import tempfile
import time

import numpy as np
import torch
from cxr_deploy.artifacts import ONNX_FP32
from cxr_deploy.bundle import save_bundle, ModelBundle
from cxr_deploy.model import build_model
from cxr_deploy.preprocessing import PreprocessSpec
from cxr_deploy.export import export_bundle
from cxr_deploy.export.inputs import ImageSet
from cxr_deploy.export.metadata import artifact_metadata
from cxr_deploy.export.quantize import quantize_int8
from cxr_deploy.export.parity import onnx_runner
work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cxr-int8-speed-")
d = os.path.join(work, "b")
fp32 = os.path.join(d, ONNX_FP32.file)
if not os.path.exists(fp32):
    torch.manual_seed(0); save_bundle(d, build_model(None), spec=PreprocessSpec(input_size=224))
    export_bundle(d, torchscript=False, onnx=True)
b = ModelBundle.load(d)
x = np.random.default_rng(0).standard_normal((32, 3, 224, 224), dtype=np.float32)
calib = ImageSet(x[:16], [str(i) for i in range(16)])
variants = {"new default (float head, 8-bit weights here)": {},
            "0.1 settings (all quantized, 7-bit weights)": {"float_head": False, "reduce_range": True}}
paths = {"fp32": fp32}
for name, s in variants.items():
    p = os.path.join(work, f"{len(paths)}.onnx")
    quantize_int8(fp32, p, calib, artifact_metadata(b, precision="int8"), s); paths[name] = p
for threads in (1, 2):
    for name, p in paths.items():
        r = onnx_runner(p, threads=threads); r(x[:8])
        best = 0
        for _ in range(3):
            t = time.perf_counter()
            for i in range(0, 32, 8): r(x[i:i+8])
            best = max(best, 32 / (time.perf_counter() - t))
        print(f"threads {threads}  {name:<46} {best:6.1f} img/s", flush=True)
