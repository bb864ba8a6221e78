"""``stoprt train``: train a model offline with STOP or BPTT (``torchrun`` for several processes)."""

from __future__ import annotations

import argparse

from ..cli_args import add_run_options, nonnegative_int, positive_float, positive_int, set_threads


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` to the top-level CLI's subparsers; returns its parser."""
    train = sub.add_parser("train", help="train a model offline with STOP or BPTT (torchrun for several processes)")
    train.add_argument("--model", default="mlp", help="mlp, dvs_gesture, vgg11, resnet18 (default mlp)")
    train.add_argument("--data", default="digits", help="digits, gestures, or a dataset folder")
    train.add_argument("--method", choices=("stop", "bptt"), default="stop")
    train.add_argument("--learn", choices=("w", "wt", "wl", "wtl"), default="wtl", help="STOP variant")
    train.add_argument("--update", default="sample", help="STOP schedule: sample, step, or every k steps (k)")
    train.add_argument("--loss", choices=("ce", "mse"), default="ce")
    train.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--epochs", type=positive_int, default=3)
    train.add_argument("--batch-size", type=positive_int, default=16)
    train.add_argument("--width", type=positive_float, default=1.0, help="channel width multiplier")
    train.add_argument("--readout", action="store_true", help="non-spiking leaky readout head")
    train.add_argument("--n-train", type=positive_int, default=None, help="use the first N samples (quick runs)")
    train.add_argument("--n-test", type=positive_int, default=None)
    train.add_argument("--out", metavar="DIR", help="checkpoint and metrics folder")
    train.add_argument("--checkpoint-every", type=nonnegative_int, default=0, metavar="N",
                       help="also checkpoint every N batches (default: each epoch)")
    train.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint")
    add_run_options(train)
    train.set_defaults(func=run_train)
    return train


def run_train(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    from ..runtime.train import TrainConfig, train
    cfg = TrainConfig(model=args.model, data=args.data, method=args.method, learn=args.learn,
                      update=args.update, loss=args.loss, optimizer=args.optimizer, lr=args.lr,
                      epochs=args.epochs, batch_size=args.batch_size, T=args.T, size=args.size,
                      width=args.width, readout=args.readout, seed=args.seed, device=args.device,
                      n_train=args.n_train, n_test=args.n_test, out_dir=args.out,
                      checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    result = train(cfg, resume=args.resume)
    if result["world_size"] > 1:
        import torch.distributed as dist
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    name = f"{args.method.upper()}" + (f"-{args.learn.upper()}" if args.method == "stop" else "")
    print(f"stoprt train: {args.model} on {args.data} with {name}, {result['world_size']} process(es)")
    for h in result["history"]:
        print(f"  epoch {h['epoch']}: train {100 * h['train_acc']:.1f}%  test {100 * h['test_acc']:.1f}%  "
              f"{h['steps_per_s']:.0f} steps/s  peak RSS {h['peak_rss_mib']:.0f} MiB")
    if args.out:
        print(f"  checkpoint, metrics.csv, metrics.json and result.json in {args.out}")
    return 0
