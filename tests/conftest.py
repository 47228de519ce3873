import pytest
import torch

# The test models are tiny: one intra-op thread is fastest and is not slowed down when another
# process holds the second core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
