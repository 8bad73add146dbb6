"""lm-eval glue of the shipped local tasks: their documents and their per-example scores.

The YAMLs beside this file name these functions with ``!function utils.<name>``; the data and the
checks live in ``evaluation.realtext``. Documents are built in memory from the installed data
(``custom_dataset``), so the tasks need no data files and read exactly what ``realtext`` splits.
"""

from __future__ import annotations

from typing import Any

from evaluation.realtext import check_completion, humaneval_rows, pydoc_splits, truncate_completion


def _test_split(rows: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def pydoc_heldout(**_: Any):
    """The held-out pydoc passages (``topic, chunk, text``); lm-eval passes the task's metadata, unused."""
    return _test_split(pydoc_splits().heldout)


def humaneval(**_: Any):
    """HumanEval's 164 problems (``task_id, prompt, canonical_solution, test, entry_point``)."""
    return _test_split(humaneval_rows())


def humaneval_solutions(**_: Any):
    """HumanEval's problems with ``context`` (the prompt without its trailing whitespace) and
    ``continuation`` (that whitespace + the canonical solution): the text lm-eval scores.

    lm-eval moves a context's trailing whitespace into the continuation before tokenizing (BPE
    vocabularies merge a newline with the indentation after it), so the prompt's final newline is
    scored with the solution either way; splitting it here makes the byte count match what is scored.
    """
    rows = []
    for row in humaneval_rows():
        context = row["prompt"].rstrip()
        rows.append(
            row | {"context": context, "continuation": row["prompt"][len(context) :] + row["canonical_solution"]}
        )
    return _test_split(rows)


def solution_bits(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """(log-likelihood of the continuation, its UTF-8 bytes): lm-eval's ``bits_per_byte``
    aggregation turns the pairs into total nats / total bytes / ln 2."""
    loglikelihood, _ = results[0]
    return {"bits_per_byte": (loglikelihood, len(doc["continuation"].encode("utf-8")))}


def pass_at_1(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the greedy completion, cut at the first of HumanEval's stop sequences, passes the
    problem's tests (run in a subprocess), else 0.0."""
    return {"pass_at_1": float(check_completion(doc, truncate_completion(results[0])).passed)}
