"""The C allocator keeps freed memory for reuse: a large block taken where a freed one was costs no
new page faults (glibc on Linux); the opt-out leaves the C library's behaviour, which maps and faults
every large block afresh."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
from sdseg_monai.allocator import keep_freed_memory
applied = keep_freed_memory()
assert keep_freed_memory() == applied  # idempotent
def faults_of_a_48_mb_tensor_after_a_64_mb_one():
    block = torch.ones(16 << 20)  # 64 MB
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(12 << 20)  # 48 MB, every page written: fits where the 64 MB block was
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": min(faults_of_a_48_mb_tensor_after_a_64_mb_one() for _ in range(3))}))
"""

glibc_linux = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def probe(**env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "SDSEG3D_MALLOC"} | env
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not glibc_linux, reason="glibc on Linux only")
def test_freed_memory_is_reused_without_page_faults_and_the_opt_out_leaves_the_system_allocator():
    kept = probe()
    assert kept["applied"] is True
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert kept["faults"] < pages // 20, kept  # the block came back from the heap, already mapped
    system = probe(SDSEG3D_MALLOC="system")  # negative control: glibc's own settings
    assert system["applied"] is False
    assert system["faults"] >= pages // 2, system  # a fresh mmap, faulted in page by page


def test_a_cpu_segmenter_and_the_command_keep_freed_memory(monkeypatch, micro_model):
    from sdseg_monai import cli, inference

    calls = []
    monkeypatch.setattr(inference, "keep_freed_memory", lambda: calls.append("segmenter"))
    inference.VolumeSegmenter(micro_model, device="cpu")
    monkeypatch.setattr("sdseg_monai.allocator.keep_freed_memory", lambda: calls.append("command"))
    assert cli.main(["--help"]) == 0
    assert calls == ["segmenter", "command"]
