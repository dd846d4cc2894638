"""Every file of the fuzzing corpus (tests/fuzz_corpus/<parser>/), seeds and the cases
fuzz runs found, through its parser: a result or a one-line error of the parser's own
kind, never another exception (see fuzz_harness.py)."""

import pytest

from fuzz_harness import corpus_files, run

FILES = corpus_files()


def test_every_parser_has_seeds():
    from fuzz_harness import PARSERS
    assert sorted({parser for parser, _ in FILES}) == sorted(PARSERS)


@pytest.mark.parametrize("parser,path", FILES, ids=[f"{p}/{f.name}" for p, f in FILES])
def test_corpus_case_keeps_the_contract(parser, path):
    run(parser, path.read_bytes())
