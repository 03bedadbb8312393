"""Training throughput (images/s) of the ResNet50 fine-tuning step on this machine: fp32 vs
bfloat16 autocast on CPU (or fp32 vs fp16 + GradScaler on CUDA), stage 2 (everything trainable)
and stage 1 (frozen backbone, head only).

It times ``cxr_deploy.training.optim.train_step`` (forward, backward, clipping, optimizer step) on
random input tensors, so decoding is excluded: decoding is measured by the DataLoader/cache path,
not here. Noisy on shared machines: it reports the median of the timed iterations.

    python benchmarks/train_throughput.py --size 224 --batch 8 --iters 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from cxr_deploy.model import build_model
from cxr_deploy.training.config import TrainConfig
from cxr_deploy.training.devices import cpu_has_native_bf16, place_model, resolve_precision, to_device
from cxr_deploy.training.optim import build_optimizer, set_train_mode, set_trainable, train_step


def measure(stage: int, amp: str, device: torch.device, size: int, batch: int, iters: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = place_model(build_model(None), device)
    set_trainable(model, stage)
    set_train_mode(model, stage)
    optimizer = build_optimizer(model, stage, TrainConfig(lr=1e-4))
    precision = resolve_precision(amp, device)
    scaler = precision.grad_scaler()
    loss_fn = nn.CrossEntropyLoss()
    x = to_device(torch.randn(batch, 3, size, size), device)  # the layout training uses there
    y = torch.randint(0, 2, (batch,), device=device)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, x, y, optimizer, loss_fn, precision, scaler, clip_grad_norm=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times), precision.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", default="2,1")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"native CPU bf16: {cpu_has_native_bf16()}, input {args.size}x{args.size}, batch {args.batch}, "
          f"median of {args.iters} iterations after {args.warmup} warm-up")
    for stage in (int(s) for s in args.stages.split(",")):
        for amp in ("off", "on"):
            ips, name = measure(stage, amp, device, args.size, args.batch, args.iters, args.warmup)
            what = "everything trainable" if stage == 2 else "frozen backbone, head only"
            print(f"stage {stage} ({what}), {name:>4}: {ips:7.2f} images/s")


if __name__ == "__main__":
    main()
