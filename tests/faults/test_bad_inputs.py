"""Every bad input of the catalog (tests/faults/bad_inputs.py) is refused in one clean line before any work."""

import pytest

from tests.faults.bad_inputs import BEGIN, CASES, END, ROOT, problems, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line(case, tmp_path):
    outcome = run_case(case, tmp_path)
    assert not problems(outcome), (problems(outcome), outcome.stderr[-2000:])


def test_the_catalog_is_large_and_the_docs_table_lists_every_case():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    doc = (ROOT / "docs" / "reliability.md").read_text()
    section = doc[doc.index(BEGIN) : doc.index(END)]
    missing = [c.id for c in CASES if f"`{c.id}`" not in section]
    assert not missing, f"docs/reliability.md lacks {missing}: run python -m tests.faults.bad_inputs"
