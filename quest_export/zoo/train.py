"""Train the bundled models and the metric classifier on Fashion-MNIST.

    python -m quest_export.zoo.train unet --model fmnist-cond --out DIR --seed 0 --steps 20000
    python -m quest_export.zoo.train classifier --out DIR --seed 0 --epochs 12

The exact commands and seeds used for the shipped weights are in quest_export/zoo/README.md
and in each model's ``quest_model.json``. Needs the data set (``apt-get install
dataset-fashion-mnist``) and, for the UNets in reasonable time, a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quest_export.zoo import architectures as arch
from quest_export.zoo.fmnist import LABELS, load_split


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_model_dir(out: Path, name: str, unet, cond_table: torch.Tensor | None, meta: dict) -> None:
    """Write a bundled model folder: unet/ (fp16 safetensors), scheduler/, conditioning, quest_model.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    unet = copy.deepcopy(unet).to("cpu", torch.float16)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    sched = dict(arch.SCHEDULER_CONFIG)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    if cond_table is not None:
        labels = list(LABELS) + ["<unconditional>"]
        save_file(
            {"encoder_hidden_states": cond_table.detach().float().cpu().contiguous()},  # (11, L, D)
            str(out / "conditioning.safetensors"),
            metadata={"uncond_index": str(arch.NULL_CLASS), "labels": json.dumps(labels)},
        )
    (out / "quest_model.json").write_text(json.dumps(meta, indent=2) + "\n")


class _EMA:
    def __init__(self, params, decay: float) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))


def train_unet(args: argparse.Namespace) -> None:
    from diffusers import DDPMScheduler
    from quest_export_runtime.images import save_grid

    from quest_export.models.sampling import SamplerSpec, sample

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = _device()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    x_all, y_all = load_split("train", args.data)
    x_all = torch.from_numpy(x_all).to(dev)  # (60000, 1, 32, 32)
    y_all = torch.from_numpy(y_all).to(dev)  # (60000,)
    conditional = args.model == "fmnist-cond"
    unet = arch.build_unet(args.model).to(dev)
    params = list(unet.parameters())
    cond_table = None
    if conditional:
        g = torch.Generator().manual_seed(args.seed)
        init = torch.randn(arch.NUM_CLASSES + 1, arch.COND_TOKENS, arch.COND_DIM, generator=g)
        cond_table = torch.nn.Parameter(init.to(dev))  # (11, L, D); row 10 = null class
        params.append(cond_table)
    n_params = sum(p.numel() for p in unet.parameters())
    _log(f"{args.model}: {n_params / 1e6:.2f}M UNet parameters on {dev}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = _EMA(params, args.ema)
    noise_sched = DDPMScheduler(**{k: v for k, v in arch.SCHEDULER_CONFIG.items()
                                   if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})  # fmt: skip
    alphas_cumprod = noise_sched.alphas_cumprod.to(dev)
    t0, step, losses = time.time(), 0, []
    n = x_all.shape[0]
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    while step < args.steps and (time.time() - t0) < args.max_minutes * 60:
        idx = torch.randint(0, n, (args.batch,), device=dev, generator=gen)
        x0, y = x_all[idx], y_all[idx]
        noise = torch.randn(x0.shape, device=dev, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), device=dev, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if conditional:
                drop = torch.rand(args.batch, device=dev, generator=gen) < args.cond_drop
                y = torch.where(drop, torch.full_like(y, arch.NULL_CLASS), y)
                eps = unet(xt, t, encoder_hidden_states=cond_table[y]).sample
            else:
                eps = unet(xt, t).sample
            loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(loss.item() if step % 50 == 0 else float("nan"))
        if step % 1000 == 0:
            _log(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        step += 1
    minutes = (time.time() - t0) / 60
    _log(f"trained {step} steps in {minutes:.1f} min")
    ema.copy_to(params)
    unet.eval()
    meta = dict(
        name=args.model,
        family="class-cond" if conditional else "uncond",
        sampling=arch.SAMPLING_DEFAULTS[args.model],
        conditioning="conditioning.safetensors" if conditional else None,
        image_size=32,
        data="Fashion-MNIST (Debian dataset-fashion-mnist), 28x28 padded to 32x32, [-1, 1]",
        training=dict(
            command="python -m quest_export.zoo.train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            seed=args.seed,
            steps=step,
            batch=args.batch,
            lr=args.lr,
            ema=args.ema,
            cond_drop=args.cond_drop if conditional else None,
            minutes=round(minutes, 2),
            device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            torch=torch.__version__,
        ),
        parameters=n_params,
    )
    out = Path(args.out)
    write_model_dir(out, args.model, unet, cond_table, meta)
    # quick look: 8 samples per class (or 64 unconditional) with the default sampler
    spec = SamplerSpec(**{k: v for k, v in arch.SAMPLING_DEFAULTS[args.model].items()})
    noise = torch.randn(80 if conditional else 64, 1, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        if conditional:
            labels = torch.arange(10, device=dev).repeat_interleave(8)
            imgs = sample(unet, arch.SCHEDULER_CONFIG, noise=noise, spec=spec, cond=cond_table[labels],
                          uncond=cond_table[arch.NULL_CLASS][None])  # fmt: skip
        else:
            imgs = sample(unet, arch.SCHEDULER_CONFIG, noise=noise, spec=spec)
    save_grid(imgs.float().cpu().numpy(), out / "samples.png", nrow=8)
    (out / "loss.json").write_text(json.dumps([x for x in losses if not math.isnan(x)]))
    _log(f"wrote {out}")


def train_classifier(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    dev = _device()
    xtr, ytr = (torch.from_numpy(a).to(dev) for a in load_split("train", args.data))
    xte, yte = (torch.from_numpy(a).to(dev) for a in load_split("t10k", args.data))
    net = arch.FashionClassifier().to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(xtr.shape[0] / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(xtr.shape[0], device=dev, generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * args.batch : (k + 1) * args.batch]
            x, y = xtr[idx], ytr[idx]
            # light augmentation: horizontal flip and a random shift of up to 2 pixels
            flip = torch.rand(x.shape[0], device=dev, generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            dx, dy = (
                int(v) for v in torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(epoch * 7919 + k))
            )
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = _accuracy(net, xte, yte)
        _log(f"epoch {epoch} loss {loss.item():.4f} test acc {acc:.4f}")
    net.eval()
    feats = []
    with torch.no_grad():
        for k in range(0, xte.shape[0], 1000):
            feats.append(net.embed(xte[k : k + 1000]).double().cpu())
    f = torch.cat(feats)  # (10000, 128)
    mu, sigma = f.mean(0), torch.cov(f.T)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors")
    )
    save_file({"mu": mu.contiguous(), "sigma": sigma.contiguous()}, str(out / "fd_reference.safetensors"),
              metadata={"split": "t10k", "n": str(f.shape[0])})  # fmt: skip
    meta = dict(test_accuracy=round(acc, 4), feature_dim=arch.FashionClassifier.feature_dim,
                command="python -m quest_export.zoo.train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                seed=args.seed, epochs=args.epochs, torch=torch.__version__)  # fmt: skip
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"wrote {out} (test accuracy {acc:.4f})")


@torch.no_grad()
def _accuracy(net, x, y) -> float:
    net.eval()
    correct = sum((net(x[k : k + 1000]).argmax(1) == y[k : k + 1000]).sum().item() for k in range(0, x.shape[0], 1000))
    net.train()
    return correct / x.shape[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m quest_export.zoo.train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    u = sub.add_parser("unet")
    u.add_argument("--model", choices=sorted(arch.UNET_CONFIGS), required=True)
    u.add_argument("--steps", type=int, default=20000)
    u.add_argument("--max-minutes", type=float, default=1e9)
    u.add_argument("--batch", type=int, default=256)
    u.add_argument("--lr", type=float, default=3e-4)
    u.add_argument("--warmup", type=int, default=500)
    u.add_argument("--ema", type=float, default=0.9995)
    u.add_argument("--cond-drop", type=float, default=0.1)
    c = sub.add_parser("classifier")
    c.add_argument("--epochs", type=int, default=12)
    c.add_argument("--batch", type=int, default=256)
    c.add_argument("--lr", type=float, default=3e-3)
    for q in (u, c):
        q.add_argument("--out", required=True)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--data", default=None, help="folder with the Fashion-MNIST .gz files")
    args = p.parse_args(argv)
    (train_unet if args.what == "unet" else train_classifier)(args)


if __name__ == "__main__":
    main()
