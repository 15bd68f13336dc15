"""Training throughput of the VAE: optimizer steps per second as VEs/s, and peak memory.

Each (encoder, size, config) case runs in its own Python process, so peak memory (CUDA max allocated,
or the process's peak RSS on the CPU) and torch.compile caches do not leak between cases. A step is
forward + loss + backward + Adam step on a synthetic batch already on the device (no data loading).

Configs are ``+``-joined tokens: ``fp32`` or ``bf16`` (autocast, the loss stays fp32 as in training),
``cl`` (channels_last_3d), ``compile`` (torch.compile of the VAE, mode default). ``eager`` = ``fp32``;
``stage`` = what ``microfp train`` uses with ``precision: auto`` and the params given by
``--stage-channels-last/--stage-compile`` (bf16 on a CUDA GPU with bf16, fp32 otherwise).

Examples::

    python benchmarks/bench_train.py --sizes 32 --encoders resnet12 --steps 2          # quick, CPU
    python benchmarks/bench_train.py --sizes 32 64 --configs eager bf16 bf16+cl bf16+cl+compile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from microfp.model import VAE, VAEConfig, param_count, vae_loss  # noqa: E402


def parse_config(config: str, device: str, stage_cl: bool, stage_compile: bool) -> dict[str, bool]:
    if config == "eager":
        config = "fp32"
    if config == "stage":
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        tokens = ["bf16" if bf16 else "fp32"] + (["cl"] if stage_cl else []) + (["compile"] if stage_compile else [])
        config = "+".join(tokens)
    tokens = set(config.split("+"))
    unknown = tokens - {"fp32", "bf16", "cl", "compile"}
    if unknown:
        raise SystemExit(f"unknown config token(s) {sorted(unknown)} in {config!r}")
    return {"bf16": "bf16" in tokens, "cl": "cl" in tokens, "compile": "compile" in tokens, "name": config}  # type: ignore[dict-item]


def run_case(args: argparse.Namespace) -> dict[str, object]:
    device = args.device
    torch.manual_seed(0)
    cfg = VAEConfig(encoder=args.case_encoder, ve_size=args.case_size, latent_dim=args.latent_dim,
                    hidden_dim=args.hidden_dim, base_channels=args.base_channels,
                    bottleneck_channels=args.bottleneck_channels)
    opts = parse_config(args.case_config, device, args.stage_channels_last, args.stage_compile)
    fmt = torch.channels_last_3d if opts["cl"] else torch.contiguous_format
    vae = VAE(cfg).to(device).to(memory_format=fmt).train()
    if opts["compile"]:
        vae.compile()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-5, weight_decay=1e-5)
    n, b = args.case_size, args.batch_size
    x = torch.rand(b, 3, n, n, n, device=device).contiguous(memory_format=fmt)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bool(opts["bf16"])):
            x_hat, mu, logvar = vae(x)
            loss = vae_loss(x_hat, x, mu, logvar)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "encoder": cfg.encoder, "size": n, "config": opts["name"], "batch": b, "device": device,
        "params_M": round(param_count(cfg)["total"] / 1e6, 2),
        "step_s": round(median, 4), "step_min_s": round(times[0], 4), "ves_per_s": round(b / median, 2),
        "warmup_s": round(warm, 2), "peak_mem_GB": round(peak / 2**30, 3),
        "peak_kind": "cuda_max_allocated" if device == "cuda" else "process_max_rss",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--encoders", nargs="+", default=["resnet12", "resnet18", "resnet34"])
    p.add_argument("--configs", nargs="+", default=None,
                   help="default: eager stage (CPU); eager bf16 bf16+cl bf16+cl+compile (CUDA)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=8192)
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--bottleneck-channels", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--stage-channels-last", action="store_true", help="train.channels_last of the stage")
    p.add_argument("--stage-compile", action="store_true", help="train.compile of the stage")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    # internal: run one case in this process
    p.add_argument("--case-encoder", help=argparse.SUPPRESS)
    p.add_argument("--case-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--case-config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case_encoder:
        print(json.dumps(run_case(args)), flush=True)
        return

    gpu_default = ["eager", "bf16", "bf16+cl", "bf16+cl+compile"]
    configs = args.configs or (["eager", "stage"] if args.device == "cpu" else gpu_default)
    passthrough = list(sys.argv[1:])
    results = []
    header = (f"{'encoder':9} {'size':>4} {'config':18} {'params':>8} {'step s':>8} {'min s':>8} {'VEs/s':>8} "
              f"{'warmup s':>8} {'peak GB':>8}")
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else os.cpu_count()} "
          f"{'' if args.device == 'cuda' else 'CPUs'}), batch {args.batch_size}, hidden {args.hidden_dim}, "
          f"latent {args.latent_dim}, base {args.base_channels}, squeeze {args.bottleneck_channels}", flush=True)
    print(header, flush=True)
    for size in args.sizes:
        for encoder in args.encoders:
            for config in configs:
                cmd = [sys.executable, __file__, *passthrough, "--case-encoder", encoder, "--case-size", str(size),
                       "--case-config", config, "--device", args.device]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{encoder:9} {size:>4} {config:18} timed out after {args.timeout:.0f} s", flush=True)
                    continue
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode != 0 or not lines:
                    err = (out.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{encoder:9} {size:>4} {config:18} failed: {err[:200]}", flush=True)
                    results.append({"encoder": encoder, "size": size, "config": config, "error": err})
                    continue
                r = json.loads(lines[-1])
                results.append(r)
                print(f"{encoder:9} {size:>4} {r['config']:18} {r['params_M']:>7.1f}M {r['step_s']:>8.3f} "
                      f"{r['step_min_s']:>8.3f} {r['ves_per_s']:>8.2f} {r['warmup_s']:>8.1f} {r['peak_mem_GB']:>8.2f}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
