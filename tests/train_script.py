"""Trains a small multi-exit network on digits; run by the resume and DDP tests as a separate
process (under torchrun for DDP).

``--kill-at EPOCH BATCH`` SIGKILLs the process (every rank) mid-epoch; ``--keep-epochs`` copies
``last.safetensors`` to ``epoch<N>.safetensors`` after every epoch (rank 0), so each epoch's
logged validation can be checked against the checkpoint written with it; ``--record-rng`` makes
every rank draw from the global torch RNG at each epoch start (as dropout would) and append the
draw to ``rng-<rank>.jsonl``; ``--hang-rank R`` makes rank R stop answering at the first epoch."""
import argparse
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

import eenn
from eenn.callbacks import Callback


class KillAt(Callback):
    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, batch, loss, exit_acc):
        if trainer.epoch == self.epoch and batch == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class KeepEpochs(Callback):
    def __init__(self, out):
        self.out = Path(out)

    def on_epoch_end(self, trainer, metrics):
        if trainer.env.is_main:  # runs after the Checkpointer: last.safetensors is this epoch's
            shutil.copyfile(self.out / "last.safetensors", self.out / f"epoch{metrics['epoch']}.safetensors")


class RecordRng(Callback):
    def __init__(self, out):
        self.out = Path(out)

    def on_epoch_start(self, trainer):
        draw = torch.rand(4).tolist()  # what a dropout layer would draw on this rank
        with (self.out / f"rng-{trainer.env.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"epoch": trainer.epoch + 1, "draw": draw}) + "\n")


class Hang(Callback):
    def __init__(self, rank):
        self.rank = rank

    def on_epoch_start(self, trainer):
        if trainer.env.rank == self.rank:
            threading.Event().wait()  # a rank that stops answering (deadlocked, stuck on I/O, ...)


def build(head):
    torch.manual_seed(0)
    return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2, 5], width=0.5,
                               head=head)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--objective", default="joint")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--head", default="linear")
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--dist-timeout", type=float, default=600.0)
    p.add_argument("--kill-at", type=int, nargs=2, default=None)
    p.add_argument("--keep-epochs", action="store_true")
    p.add_argument("--record-rng", action="store_true")
    p.add_argument("--hang-rank", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    data = eenn.load_dataset("digits", seed=0)
    cbs = [KillAt(*a.kill_at)] if a.kill_at else []
    cbs += [KeepEpochs(a.out)] if a.keep_epochs else []
    cbs += [RecordRng(a.out)] if a.record_rng else []
    cbs += [Hang(a.hang_rank)] if a.hang_rank is not None else []
    eenn.fit(build(a.head), data, a.objective, callbacks=cbs, epochs=a.epochs, lr=a.lr, batch_size=64,
             eval_batch_size=a.eval_batch_size, dist_timeout=a.dist_timeout, deterministic=True, out_dir=a.out,
             progress=False, augment=True, crop_padding=1, flip=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
