"""Which passage, if any, supports a sentence a model wrote: the model phrases, the passages decide.

A small model cannot be trusted to pick the passage it draws on, nor to copy a quote exactly. So the
model writes plain sentences (no markers, no quotes; rag.ANSWER_GRAMMAR), and each sentence is given
to the first passage, in rank order, one of whose sentences holds every term the model's sentence adds
to the question (its words beyond the question's own, numbers included, compared stemmed) together with
at least half as many of the question's own terms as the passage sentence that holds most of them (the
passage's headings and title, less their section numbers, count as part of each of its sentences), so that a
number taken from a line about something else ("within 6 hours" for an extension) does not verify. A
sentence that adds nothing (it only restates the question) or adds a term no passage sentence holds
("3 years" where the passage says 25, "orange" where it says purple) is supported by none and is never
shown as cited.
"""

from __future__ import annotations

import math

from appliance.answers.answerability import question_terms
from appliance.answers.citations import sentences
from appliance.retrieval.keyword_search import term, tokens
from appliance.retrieval.retrieve import Hit

# What a model says about the passages rather than from them.
SELF_REFERENCE = frozenset(term(w) for w in "answer passage passages question document documents text".split())


def added_terms(sentence: str, question: str) -> set[str]:
    """The stemmed terms of `sentence` that the question does not already hold."""
    return set(question_terms(sentence)) - set(question_terms(question))


def _terms(text: str) -> set[str]:
    return {term(word) for word in tokens(text)}


def supporting_passage(sentence: str, question: str, hits: list[Hit]) -> int | None:
    """The number (from 1) of the first passage one of whose sentences holds every term the sentence adds and at
    least half as many of the question's terms as the passage sentence that holds most of them; None if none does.
    """
    added = added_terms(sentence, question)
    if not added or added & SELF_REFERENCE:
        return None
    asked = set(question_terms(question))
    held_by: list[tuple[int, set[str]]] = []
    for number, hit in enumerate(hits, start=1):
        headings = {t for t in _terms(f"{hit.section} {hit.title}") if not t.isdigit()}  # "3. Maternity records"
        held_by += [(number, _terms(passage_sentence) | headings) for passage_sentence in sentences(hit.text)]
    best = max((len(asked & held) for _, held in held_by), default=0)
    needed = max(1, math.ceil(best / 2)) if asked else 0
    for number, held in held_by:
        if added <= held and len(asked & held) >= needed:
            return number
    return None
