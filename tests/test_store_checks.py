"""The CPU store checks what a graph loads or stores against what it holds: records of another
count, rank, size or dtype never reach a compiled graph; they end the valid prefix, so the
assemble step uses the stored K,V for those positions (exact). Records that broadcast fit."""
from __future__ import annotations

import pytest
import torch

from kvpr_compile import report
from kvpr_compile.runtime.geometry import CacheGeometry
from kvpr_compile.runtime.store import KVStore

pytestmark = pytest.mark.quick


@pytest.fixture(autouse=True)
def fresh_warnings():
    report._WARNED.clear()


def _misfit():
    return pytest.warns(UserWarning, match="do not fit this graph")


def _store():
    return KVStore(CacheGeometry(num_layers=1, batch_size=3, max_seq_len=16, num_kv_heads=2,
                                 head_dim=4, dtype=torch.float32, device=torch.device("cpu")))


def _records(n, *shapes, dtype=torch.float32, start=0.0):
    return [torch.arange(n * int(torch.tensor(s).prod())).float().to(dtype).reshape(n, *s) + start
            for s in shapes]


@pytest.mark.filterwarnings("error")
def test_matching_records_round_trip():
    st = _store()
    recs = _records(5, (3, 1, 8), (1, 1, 4))
    st.write_tokens(0, 0, recs)
    out = st.read_tokens(0, 5, [((3, 1, 8), torch.float32), ((1, 1, 4), torch.float32)], "cpu")
    assert all(torch.equal(a, b) for a, b in zip(out, recs)) and st.token_len == [5]


def test_fewer_stored_records_than_loaded_end_the_prefix():
    """A prefill that kept only X, a decode graph that loads X and a position table."""
    st = _store()
    st.write_tokens(0, 0, _records(5, (3, 1, 8)))
    specs = [((3, 1, 8), torch.float32), ((1, 1, 4), torch.float32)]
    with _misfit():
        out = st.read_tokens(0, 5, specs, "cpu")
    assert [tuple(t.shape) for t in out] == [(5, 3, 1, 8), (5, 1, 1, 4)]
    assert st.token_len == [0] and st.dropped_tokens == 1


def test_other_dtype_or_size_end_the_prefix():
    st = _store()
    st.write_tokens(0, 0, _records(4, (3, 1, 8)))
    with _misfit():
        assert st.token_sources(0, [((3, 1, 8), torch.float16)]) is None and st.token_len == [0]
    st.write_tokens(0, 0, _records(4, (3, 1, 8)))
    with _misfit():
        assert st.token_sources(0, [((3, 1, 6), torch.float32)]) is None and st.token_len == [0]


@pytest.mark.filterwarnings("error")
def test_batch_one_records_widen_to_the_batch():
    """Prefill without position_ids (cos of batch 1), decode with (B, 1) ids (batch 3)."""
    st = _store()
    first = _records(4, (1, 1, 4))
    st.write_tokens(0, 0, first)
    spec = [((3, 1, 4), torch.float32)]
    seen = st.read_tokens(0, 4, spec, "cpu")[0]          # broadcast on load
    assert torch.equal(seen, first[0].expand(4, 3, 1, 4))
    nxt = _records(1, (3, 1, 4), start=100.0)
    st.write_tokens(0, 4, nxt)                          # widened once, old rows kept
    assert tuple(st.tokens[0][0].shape) == (16, 3, 1, 4) and st.token_len == [5]
    out = st.read_tokens(0, 5, spec, "cpu")[0]
    assert torch.equal(out[:4], first[0].expand(4, 3, 1, 4)) and torch.equal(out[4:], nxt[0])
    st.write_tokens(0, 5, _records(2, (1, 1, 4), start=7.0))   # narrower record, written expanded
    assert st.token_len == [7]
    assert torch.equal(st.tokens[0][0][5:7, 2], _records(2, (1, 4), start=7.0)[0])


def test_misfit_write_replaces_the_layout_and_keeps_no_prefix():
    st = _store()
    st.write_tokens(0, 0, _records(4, (3, 1, 8)))
    with _misfit():
        st.write_tokens(0, 4, _records(1, (3, 1, 8), (1, 1, 4)))  # one more record kind from here
    assert len(st.tokens[0]) == 2 and st.token_len == [0] and st.dropped_tokens == 1
    st.write_tokens(0, 0, _records(3, (3, 1, 8), (1, 1, 4)))   # a fresh sequence starts over
    assert st.token_len == [3]


def test_a_write_of_another_geometry_after_a_good_one_still_raises():
    """The checks remember the last geometry they accepted; anything else is checked again."""
    from kvpr_compile.runtime.checks import check_read, check_write
    st = _store()
    k = torch.zeros(3, 2, 1, 4)
    check_write(st, 0, 0, k, k)
    check_read(st, 0, 1, 3, 2, 4, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="head_dim=4"):
        check_write(st, 0, 1, torch.zeros(3, 2, 1, 5), torch.zeros(3, 2, 1, 5))
    with pytest.raises(TypeError, match="cache holds torch.float32"):
        check_read(st, 0, 1, 3, 2, 4, torch.float64, torch.device("cpu"))
    with pytest.raises(ValueError, match="exceed max_seq_len=16"):
        check_write(st, 0, 16, k, k)
