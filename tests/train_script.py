"""Trains a small multi-exit network on digits; run by the resume and DDP tests as a separate
process (under torchrun for DDP). ``--kill-at EPOCH BATCH`` SIGKILLs the process mid-epoch."""
import argparse
import os
import signal
import sys

import torch

import eenn
from eenn.callbacks import Callback


class KillAt(Callback):
    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, batch, loss, exit_acc):
        if trainer.epoch == self.epoch and batch == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


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
    p.add_argument("--kill-at", type=int, nargs=2, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data = eenn.load_dataset("digits", seed=0)
    cbs = [KillAt(*a.kill_at)] if a.kill_at else []
    eenn.fit(build(a.head), data, a.objective, callbacks=cbs, epochs=a.epochs, lr=a.lr, batch_size=64,
             deterministic=True, out_dir=a.out, progress=False, augment=True, crop_padding=1, flip=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
