"""The backend's options: one frozen, typed object, every field checked once, unknown names
listed with the known ones (the messages users see from torch.compile(..., options=...))."""
from __future__ import annotations

import dataclasses

import pytest

from kvpr_compile.options import KNOWN, Options, parse_options

pytestmark = pytest.mark.quick


def test_defaults():
    o = parse_options(None)
    assert o == Options() == parse_options({})
    assert (o.ratio, o.profile, o.overlap, o.inner) == (None, None, "stream", None)
    assert (o.schedule, o.micro_batches, o.gpu_budget_bytes) == ("latency", None, None)
    assert o.resident_ratio is None and o.cpu_ratio is None   # None: the plan chooses
    assert set(KNOWN) == {"ratio", "resident_ratio", "profile", "overlap", "inner", "schedule",
                          "micro_batches", "gpu_budget_bytes", "cpu_ratio"}


def test_every_field_has_a_docstring():
    import inspect
    source = inspect.getsource(Options)
    for name in KNOWN:
        after = source.split(f"\n    {name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), name


def test_frozen_and_replace_checks_again():
    o = parse_options({"ratio": 1})
    assert o.ratio == 1.0 and isinstance(o.ratio, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.ratio = 0.5
    assert dataclasses.replace(o, inner="eager").inner == "eager"
    with pytest.raises(ValueError, match=r"options\['inner'\]"):
        dataclasses.replace(o, inner="tvm")
    assert parse_options(o) is o


def test_unknown_names_are_listed_with_the_known_ones():
    with pytest.raises(ValueError) as err:
        parse_options({"bogus": 1, "ratoi": 0.5, "ratio": 0.5})
    text = str(err.value)
    assert text.startswith("kvpr: unknown option(s) ['bogus', 'ratoi']; known: [")
    assert all(repr(name) in text.split("known:")[1] for name in KNOWN)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "0.5", True])
def test_ratio(bad):
    with pytest.raises(ValueError, match=r"kvpr: options\['ratio'\] must be a number in \[0, 1\]"):
        parse_options({"ratio": bad})


@pytest.mark.parametrize("field,bad,match", [
    ("inner", "tvm", r"options\['inner'\] must be one of \('eager', 'piecewise', 'inductor'\), "
                     r"got 'tvm'"),
    ("overlap", "diagonal", r"options\['overlap'\] must be one of \('row', 'stream'\), "
                            r"got 'diagonal'"),
    ("schedule", "sideways", r"options\['schedule'\] must be one of \('latency', 'throughput'\), "
                             r"got 'sideways'"),
])
def test_choices(field, bad, match):
    with pytest.raises(ValueError, match=match):
        parse_options({field: bad})


@pytest.mark.parametrize("m", [0, -2, True, 2.0, "2"])
def test_micro_batches(m):
    with pytest.raises(ValueError, match=r"options\['micro_batches'\] must be an int >= 1 or None"):
        parse_options({"schedule": "throughput", "micro_batches": m})


@pytest.mark.parametrize("budget", [0, -1.0, True, "1e9", float("nan")])
def test_gpu_budget_bytes(budget):
    with pytest.raises(ValueError, match=r"options\['gpu_budget_bytes'\] must be a positive"):
        parse_options({"schedule": "throughput", "gpu_budget_bytes": budget})


@pytest.mark.parametrize("name,value", [("micro_batches", 2)])
def test_throughput_only_options(name, value):
    with pytest.raises(ValueError, match=rf"options\['{name}'\] applies to "
                                         r"schedule='throughput' only \(schedule is 'latency'\)"):
        parse_options({name: value})


def test_good_values_are_kept():
    o = parse_options({"ratio": 0, "profile": "a100-pcie4", "overlap": "row", "inner": "piecewise",
                       "schedule": "throughput", "micro_batches": 3, "gpu_budget_bytes": 8e9})
    assert o == Options(0.0, "a100-pcie4", "row", "piecewise", "throughput", 3, 8e9)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "0.5", True, None.__class__])
def test_resident_ratio(bad):
    with pytest.raises(ValueError,
                       match=r"kvpr: options\['resident_ratio'\] must be a number in \[0, 1\]"):
        parse_options({"resident_ratio": bad})


def test_ratio_and_resident_ratio_share_one_past():
    assert parse_options({"ratio": 0.5, "resident_ratio": 0.5}).resident_ratio == 0.5
    with pytest.raises(ValueError, match=r"options\['ratio'\] \(0.75\) \+ "
                                         r"options\['resident_ratio'\] \(0.5\) must not exceed 1"):
        parse_options({"ratio": 0.75, "resident_ratio": 0.5})


def test_throughput_schedule_refuses_a_resident_share_in_words():
    assert parse_options({"schedule": "throughput", "resident_ratio": 0}).resident_ratio == 0.0
    with pytest.raises(ValueError, match=r"resident_ratio'\] \(0.5\) applies to "
                                         r"schedule='latency' only: the throughput schedule "
                                         r"keeps no resident share"):
        parse_options({"schedule": "throughput", "resident_ratio": 0.5})


def test_gpu_budget_bytes_on_the_latency_schedule():
    assert parse_options({"gpu_budget_bytes": 1e9}).gpu_budget_bytes == 1e9
    assert parse_options({"gpu_budget_bytes": "auto"}).gpu_budget_bytes == "auto"
    for bad in ("lots", float("inf"), 0, -1):
        with pytest.raises(ValueError, match=r"options\['gpu_budget_bytes'\] must be a positive "
                                             r"number or 'auto', got"):
            parse_options({"gpu_budget_bytes": bad})
    with pytest.raises(ValueError, match=r"'auto' applies to schedule='latency' only"):
        parse_options({"schedule": "throughput", "gpu_budget_bytes": "auto"})
