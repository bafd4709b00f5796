"""backend="kvpr" resolves through the torch_dynamo_backends entry point, without importing
kvpr_compile first (a fresh interpreter, so nothing was imported by the test session)."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_backend_name_works_without_import():
    code = textwrap.dedent("""
        import sys, warnings
        import torch
        assert "kvpr_compile" not in sys.modules
        assert "kvpr" in torch._dynamo.list_backends()
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="kvpr")
        x = torch.randn(8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(f(x), torch.sin(x) * 2)
        assert not any("kvpr" in str(w.message) for w in caught)   # no attention: no problem
        import kvpr_compile
        assert any("compiled unchanged" in n for n in kvpr_compile.last_report().notes)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
