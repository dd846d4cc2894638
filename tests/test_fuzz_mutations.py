"""Byte-level fuzzing of every parser from its corpus: a seed from tests/fuzz_corpus/
flipped, cut, extended, overwritten or spliced with another seed, through
fuzz_harness.run (a result or the parser's one-line error, nothing else).  Structured
properties with exact oracles are beside each parser's other tests
(test_memory_table_fuzz.py, test_template_fuzz.py, test_loader_fuzz.py, tests/qmp,
tests/virtio).  A state is half the time restamped (length and sha256 made right)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_harness import PARSERS, fuzz_settings, restamp, run, seeds

BYTES = st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, ord("{"), ord("}"), ord('"'), ord("\n")])


@st.composite
def mutated(draw, parser, pool):
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "set", "cut", "extend", "insert", "splice"]))
        at = draw(st.integers(0, len(data))) if data else 0
        if how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "set" and at < len(data):
            data[at] = draw(st.one_of(BYTES, st.integers(0, 255)))
        elif how == "cut":
            del data[at:]
        elif how == "extend":
            data += draw(st.binary(max_size=64))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "splice":
            other = draw(st.sampled_from(pool))
            data[at:] = other[draw(st.integers(0, len(other))):]
    if parser == "template_state" and draw(st.booleans()):
        return restamp(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_mutated_seeds_keep_the_contract(parser):
    pool = seeds(parser)     # read once: a campaign adds the cases it finds meanwhile

    @fuzz_settings(40)
    @given(data=mutated(parser, pool))
    def check(data):
        run(parser, data)
    check()
