"""cggr._host: the one helper for reading small device values on the host."""

import torch

from cggr._host import HostCopy


def test_host_copy_reads_values():
    c = HostCopy(torch.tensor(7))
    assert c.ready() and c.get() == 7
    assert HostCopy(torch.tensor([1, 2])).get() == [1, 2]
