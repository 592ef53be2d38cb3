"""engine.compat's torch.compile probe: "auto" compiles only where it can work, and says why not elsewhere."""

from __future__ import annotations

import sys
import types

import torch

from engine.compat import c_compiler, compile_unsupported_reason


def test_compile_is_for_cuda_gpus_of_ampere_or_newer():
    assert "CUDA GPUs only" in compile_unsupported_reason(torch.device("cpu"))
    reason = compile_unsupported_reason(torch.device("cuda"), capability=(7, 5))  # RTX 20xx
    assert "8.0 or newer" in reason and "7.5" in reason


def test_compile_needs_triton_and_a_c_compiler(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    assert "Triton" in compile_unsupported_reason(torch.device("cuda"), capability=(8, 6))

    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert c_compiler() is None
    assert "install gcc" in compile_unsupported_reason(torch.device("cuda"), capability=(8, 9))

    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    assert c_compiler() == str(compiler)
    assert compile_unsupported_reason(torch.device("cuda"), capability=(8, 9)) is None
