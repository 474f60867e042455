"""gist.infra.allocator: with freed memory kept, the dense word-embedding gradient that every training step
allocates and frees stops faulting its pages in again each step."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# Ten steps' worth of a MiniLM-sized word-embedding gradient (30522 x 384 floats, 47 MB): backward through
# the lookup, then zero_grad(set_to_none=True). Prints the page faults of the last five.
STEPS = """
import resource, sys, torch
from gist.infra.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
emb = torch.nn.Embedding(30522, 384)
ids = torch.randint(0, 30522, (16, 40))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    emb(ids).square().sum().backward()
    emb.weight.grad = None
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[5:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_serves_the_next_steps_gradient_without_page_faults():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = 30522 * 384 * 4 // 4096  # 11,446 pages of 4 KiB per gradient
    assert faults("default") >= 5 * pages // 2  # glibc mmaps and unmaps it each step (measured: 11,446 a step)
    assert faults("keep") < pages // 4  # reused from the heap (measured: 0 in steady state)
