"""The runtime's bodies of the ``kvpr::`` ops (defined in ops/library.py), registered on import.

On CUDA each op hands over to ``cuda_runtime`` (side streams, events, device slots); on CPU to
``direct``'s synchronous functions, the same ones the compiled step calls. Importing this module
is what makes the ops runnable (the weight hooks' bodies come with weight_stream.py): ``cache.py``
and the backend import it before any graph runs.
"""
from __future__ import annotations

import torch

from ..ops import library
from ..ops.specs import split_specs
from . import cuda_runtime, direct
from . import weight_stream  # noqa: F401  (registers the bodies of the kvpr::weights_* ops)
from .checks import check_read, check_token_read, check_write
from .store import lookup


def _kernel_of(op):
    """Register the decorated function as ``op``'s body on every device."""
    def register(fn):
        torch.library.register_kernel(op, None, fn)
        return fn
    return register


@_kernel_of(library.cache_update)
def cache_update(handle, k, v, layer, pos, start=0):
    store = lookup(handle)
    check_write(store, layer, pos, k, v)
    handle[1] += 1   # the cache's version: every op that writes the store bumps it
    if cuda_runtime.handles(k.device):
        return cuda_runtime.runtime(store, k.device).cache_update(store, k, v, layer, pos,
                                                                  start)
    return direct.cpu_cache_update(store, k, v, layer, pos, start)


@_kernel_of(library.load_kv)
def load_kv(handle, layer, start, end, batch, heads, head_dim, dtype, device, owned=False):
    store = lookup(handle)
    check_read(store, layer, end, batch, heads, head_dim, dtype, device)
    if cuda_runtime.handles(device):  # views (b, heads, n, d) of a sequence-major device slot
        return cuda_runtime.runtime(store, device).load_kv(store, layer, start, end, batch, heads,
                                                            head_dim, dtype, owned)
    k, v = store.read_kv(layer, start, end, device)
    return k.contiguous(), v.contiguous()


@_kernel_of(library.load_tokens)
def load_tokens(handle, layer, end, shapes, ranks, dtypes, device, owned=False, start=0):
    specs = split_specs(shapes, ranks, dtypes)
    store = lookup(handle)
    check_token_read(store, layer, end, specs)
    if cuda_runtime.handles(device):  # views (end - start, *record) of a device slot
        return cuda_runtime.runtime(store, device).load_tokens(store, layer, end, specs, owned,
                                                                start)
    loaded = store.read_tokens(layer, end, specs, device, start)
    return [t.clone() if t.device.type == "cpu" else t for t in loaded]


@_kernel_of(library.wait)
def wait(tensors):
    cuda_runtime.wait(tensors)


@_kernel_of(library.store_tokens)
def store_tokens(handle, layer, pos, k, v, inputs, tdims, shared=None):
    store = lookup(handle)
    check_write(store, layer, pos, k, v)
    links = direct.links_of(shared)
    if cuda_runtime.handles(k.device):  # asynchronous, on the D2H stream
        # staged: inductor, which runs these ops, may reuse the sources' memory right after
        records = direct.records(inputs, tdims, k.shape[2])
        cuda_runtime.runtime(store, k.device).store_tokens_staged(store, layer, pos, k, v,
                                                                  records, links)
    else:
        direct.cpu_store(store, layer, pos, k, v, inputs, tdims, links)
    handle[1] += 1


@_kernel_of(library.prefetch_next)
def prefetch_next(handle, layer, past, new, num, den, shapes, ranks, dtypes, batch, heads,
                  head_dim, dtype, device, resident_num=0, resident_den=1, resident_cap=-1,
                  ratio_of_rest=False, cpu_num=0, cpu_den=1):
    if cuda_runtime.handles(device):
        direct.stream_prefetch_next(lookup(handle), layer, past, new, num, den,
                                    split_specs(shapes, ranks, dtypes), batch, heads, head_dim,
                                    dtype, device,
                                    (resident_num, resident_den, resident_cap, ratio_of_rest),
                                    (cpu_num, cpu_den))


@_kernel_of(library.assemble)
def assemble(handle, layer, k_rec, v_rec, k_load, v_load, k_new, v_new, resident=0,
             resident_num=0, resident_den=1, resident_cap=-1, start=0, cpu_len=0):
    store = lookup(handle)
    residency = (resident, resident_num, resident_den, resident_cap)
    if cuda_runtime.handles(k_new.device):
        return cuda_runtime.runtime(store, k_new.device).assemble(
            store, layer, k_rec, v_rec, k_load, v_load, k_new, v_new, residency,
            start=start, cpu_len=cpu_len)
    return direct.cpu_assemble(store, layer, k_rec, v_rec, k_load, v_load, k_new, v_new,
                               residency, start=start, cpu_len=cpu_len)


@_kernel_of(library.cpu_attend)
def cpu_attend(handle, layer, q, start, end, mask, scale, scores, extras):
    return direct.cpu_attend(lookup(handle), layer, q, start, end, mask, scale, scores,
                             list(extras))


library.set_slot_views(lambda device: cuda_runtime.handles(device))
