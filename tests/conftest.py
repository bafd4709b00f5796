"""pytest hooks and shared fixtures: --run-slow and the cuda marker, fresh Dynamo state per test,
the op paths (CPU, CUDA runtime on simulated streams) and the simulated-stream fixtures. Plain
helpers live in helpers.py."""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow"))
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cache entries or recompile budget carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["cpu", "runtime-sim"])
def path(request, monkeypatch):
    """Run the kvpr ops on the synchronous CPU path, or through the CUDA runtime's logic on
    simulated streams (sim_streams.SimApi)."""
    if request.param == "runtime-sim":
        from kvpr_compile.runtime import cuda_runtime
        from sim_streams import SimApi
        monkeypatch.setattr(cuda_runtime, "API", SimApi())
    return request.param


@pytest.fixture
def sim_api(monkeypatch):
    """The CUDA runtime's stream and event calls on simulated streams, every device counted as
    one the runtime handles; returns the sim_streams.SimApi (``races`` lists what it caught).
    ``sim`` is the one that also logs the store's reads and writes."""
    from kvpr_compile.runtime import cuda_runtime
    from sim_streams import SimApi
    api = SimApi()
    monkeypatch.setattr(cuda_runtime, "API", api)
    monkeypatch.setattr(cuda_runtime, "handles", lambda device: True)
    return api


@pytest.fixture
def sim(monkeypatch):
    """Call the returned function to route CPU ops through the CUDA runtime on SimApi
    (``complete_after``: see ``SimApi``), with the store's reads and writes, the stores' sources,
    the waits and the slots' give-backs logged to its race checker."""
    from kvpr_compile.runtime import cuda_runtime, host_memory
    from kvpr_compile.runtime.slots import SlotPool
    from kvpr_compile.runtime.store import KVStore
    from sim_streams import SimApi
    api = SimApi()

    def enable(complete_after=None):
        api.complete_after = complete_after
        monkeypatch.setattr(cuda_runtime, "API", api)
        races = api.races
        cur = lambda: api.current  # noqa: E731

        write_kv, write_tokens, read_kv = KVStore.write_kv, KVStore.write_tokens, KVStore.read_kv
        wait, give_back = cuda_runtime.wait, SlotPool.give_back
        store_tokens = cuda_runtime.CudaRuntime.store_tokens

        def logged_write_kv(self, layer, pos, k, v):
            n = k.shape[2]
            for src, dst in ((k, self.k[layer]), (v, self.v[layer])):
                races.read(cur(), src, "new K/V")
                races.write(cur(), dst[pos:pos + n], f"stored K/V {layer}")
            write_kv(self, layer, pos, k, v)

        def logged_write_tokens(self, layer, pos, records, links=()):
            write_tokens(self, layer, pos, records, links)
            for src, dst in zip(records, self.tokens[layer]):
                races.read(cur(), src, "new record")
                races.write(cur(), dst[pos:pos + src.shape[0]], f"stored record {layer}")

        def logged_read_kv(self, layer, start, end, device):
            for src in (self.k[layer], self.v[layer]):
                races.read(cur(), src[start:end], f"stored K/V {layer}")
            return read_kv(self, layer, start, end, device)

        def logged_store_tokens(self, store, layer, pos, k, v, records, keep, links=()):
            for t in (k, v, *records):   # compute produced them just before (once: cos/sin are
                if not api.is_watched(t):   # shared by every layer)
                    races.write(api.compute, t, "compute output")
                    api.watch_release(t, "a store copy's source")   # read by the D2H copy
            return store_tokens(self, store, layer, pos, k, v, records, keep, links)

        def logged_wait(tensors):
            wait(tensors)
            for t in tensors:
                races.read(cur(), t, "loaded (after wait)")

        def logged_give_back(self, layer, stream):
            slot = self.held.get(layer)
            for buf in ([*(slot.kv or ()), *slot.tokens] if slot else []):
                races.read(stream, buf, "slot (recompute/assemble)")
            give_back(self, layer, stream)

        alloc = host_memory.alloc

        def host_alloc(shape, dtype, pin, zero=True):
            t = alloc(shape, dtype, pin, zero)
            races.forget(t)   # host memory: no device history (Races.forget)
            return t

        monkeypatch.setattr(host_memory, "alloc", host_alloc)
        monkeypatch.setattr(KVStore, "write_kv", logged_write_kv)
        monkeypatch.setattr(KVStore, "write_tokens", logged_write_tokens)
        monkeypatch.setattr(KVStore, "read_kv", logged_read_kv)
        monkeypatch.setattr(cuda_runtime.CudaRuntime, "store_tokens", logged_store_tokens)
        monkeypatch.setattr(cuda_runtime, "wait", logged_wait)
        monkeypatch.setattr(SlotPool, "give_back", logged_give_back)
        return api
    return enable


@pytest.fixture
def isolated_profiles(monkeypatch, tmp_path):
    """No $KVPR_PROFILE and a profile cache of the test's own."""
    monkeypatch.delenv("KVPR_PROFILE", raising=False)
    monkeypatch.setenv("KVPR_CACHE_DIR", str(tmp_path / "cache"))
