"""Small networks shared by several test files."""
import torch
from torch import nn

import eenn


def spread_net(head: str = "linear", **opts) -> eenn.MultiExitNetwork:
    """ResNet-20 (width 0.5, 8x8 grey input, exits after stages 1, 3, 5) in eval mode, with its
    BatchNorm statistics spread at random so that the exits disagree in interesting ways."""
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 3, 5],
                              head=head, width=0.5, **opts)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()
