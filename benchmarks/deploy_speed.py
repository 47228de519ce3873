"""Early exit against the best static deployment of the same network, on this machine.

Trains (or reuses, --checkpoint: any saved network, e.g. a ViT from configs/fmnist_vit.yaml) a
ResNet-20 with exits on Fashion-MNIST, calibrates max_prob on
the validation split for a 1-point drop, then times the static network and the early-exit network
on every path eenn offers here (eenn.deployments; on a CPU: PyTorch eager, PyTorch optimised,
onnxruntime at 1 thread, at torch's thread count and as N x 1 thread; on CUDA: PyTorch eager and
CUDA graphs in float32 and bf16, each also re-batched), on test samples at each batch size. Prints one table per
batch size, the speed-up of the fastest early-exit path over the fastest static path (both named)
against the MAC speed-up, and ends with the line

    worst ratio over the best static: X.XX

Targets (issue 16): >= 0.85 at batch 1 and 256 on 2 CPU threads; on a GPU, over the network under
CUDA graphs, >= 2.0x at batch 1, 1.6x at 256, 1.5x at 4096 (benchmarks/gpu_checks.sh runs it there).

    .venv/bin/python benchmarks/deploy_speed.py --checkpoint runs/deploy-speed.safetensors
    python benchmarks/deploy_speed.py --device cuda --batches 1,256,4096 --samples 512,8192,8192
"""
import argparse
import os
import platform

import torch

import eenn
from eenn.deployments import deployments, format_deployments, time_deployments
from eenn.inference import tune_cpu_allocator


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--limit", type=int, default=20000, help="images per split, training, validation and test (0: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--exits", default="linear:3")
    p.add_argument("--policy", default="max_prob")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--batches", default="1,256")
    p.add_argument("--samples", default=None,
                   help="test samples timed per batch size, one value or one each (default: 512 at batch 1, "
                        "8 batches' worth (at least 2048) at larger ones)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: CUDA graphs, bf16 where it holds)")
    p.add_argument("--checkpoint", help="reuse this trained network if the file exists, else train and save it there")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tune_cpu_allocator()
    data = eenn.load_dataset(a.dataset, limit=a.limit or None)
    if a.checkpoint and os.path.exists(a.checkpoint):
        net = eenn.load(a.checkpoint)
        if net.input_spec is None:
            net.input_spec = eenn.InputSpec.from_info(data.info)
    else:
        torch.manual_seed(0)
        i = data.info
        net = eenn.create_network("resnet20", in_channels=i.in_channels, num_classes=i.num_classes,
                                  input_size=i.input_size, exits=a.exits)
        eenn.fit(net, data, "joint", epochs=a.epochs, lr=0.05, progress=False)
        if a.checkpoint:
            eenn.save(net, a.checkpoint)
    net.eval().to(a.device)
    policy = eenn.calibrate(a.policy, eenn.collect_outputs(net, data.val), net.cost(), {"max_drop": a.max_drop})
    batches = [int(v) for v in a.batches.split(",")]
    if a.samples is None:
        samples = [512 if b == 1 else max(2048, 8 * b) for b in batches]
    else:
        samples = [int(v) for v in a.samples.split(",")]
        samples = (samples * len(batches))[: len(batches)] if len(samples) == 1 else samples
        if len(samples) != len(batches):
            p.error(f"--samples gives {len(samples)} counts for {len(batches)} batch sizes: one value or one each")
    x = net.preprocess(data.test.x[: max(samples)].to(a.device))
    paths = deployments(net, policy, device=a.device, val=data.val)
    timing = time_deployments(net, policy, x, batches, samples=samples, repeats=a.repeats, paths=paths)
    test = eenn.policies.report_goal(policy, eenn.collect_outputs(net, data.test), net.cost(), {"max_drop": a.max_drop})
    spec = net.backbone.spec or {}
    name = spec.get("name") or (net.source or {}).get("model_class", "network")
    print(f"{name} {spec.get('options') or ''}, exits at stages {net.exit_stages}, {a.dataset}; {a.policy} calibrated on validation for a "
          f"{100 * a.max_drop:g}-point drop (thresholds {[round(t, 4) for t in policy.thresholds.tolist()]}); "
          f"{torch.cuda.get_device_name() if a.device == 'cuda' else platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"test split ({len(data.test)} images): final exit {100 * test['final_accuracy']:.2f}%, early exit "
          f"{100 * test['accuracy']:.2f}% at {test['speedup']:.2f}x fewer MACs "
          f"({100 * (1 - 1 / test['speedup']):.0f}% saved, heads counted); "
          f"exits {[round(100 * v, 1) for v in test['exit_distribution']]}%\n")
    print("\n".join(format_deployments(timing)))


if __name__ == "__main__":
    main()
