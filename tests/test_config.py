"""kvpr_compile/config.py: the runtime switches, read where used, and ``patch``."""
from __future__ import annotations

import pytest

from kvpr_compile import config

pytestmark = pytest.mark.quick


def test_patch_sets_switches_inside_and_restores_them_after_an_exception():
    before = config.shared_slots
    with pytest.raises(RuntimeError), config.patch(shared_slots=not before):
        assert config.shared_slots is (not before)
        raise RuntimeError("leave the block")
    assert config.shared_slots is before


def test_patch_as_a_decorator_applies_on_every_call():
    @config.patch(assemble_in_place=True, prefetch_next_call=False)
    def read():
        return config.assemble_in_place, config.prefetch_next_call
    assert read() == read() == (True, False)
    assert (config.assemble_in_place, config.prefetch_next_call) == (False, True)


def test_patch_refuses_unknown_names_and_non_bools_at_once():
    with pytest.raises(AttributeError, match="no switch assemble_inplace"):
        config.patch(assemble_inplace=True)
    with pytest.raises(TypeError, match="is a bool"):
        config.patch(shared_slots=0)
    assert config.SWITCHES == ("assemble_in_place", "shared_slots", "prefetch_next_call")
