"""Which passage, if any, supports a sentence a model wrote: the model phrases, the passages decide.

A small model cannot be trusted to pick the passage it draws on, nor to copy a quote exactly. So the
model writes plain sentences (no markers, no quotes; rag.ANSWER_GRAMMAR), and each sentence is given
to the first passage, in rank order, that holds every term the sentence adds to the question: its
words beyond the question's own, numbers included, compared stemmed. A sentence that adds nothing
(it only restates the question) or adds a term no passage holds ("3 years" where the passage says
25, "orange" where it says purple) is supported by none and is never shown as cited.
"""

from __future__ import annotations

from appliance.answerability import passage_terms, question_terms
from appliance.keyword_search import term
from appliance.retrieve import Hit

# What a model says about the passages rather than from them.
SELF_REFERENCE = frozenset(term(w) for w in "answer passage passages question document documents text".split())


def added_terms(sentence: str, question: str) -> set[str]:
    """The stemmed terms of `sentence` that the question does not already hold."""
    return set(question_terms(sentence)) - set(question_terms(question))


def supporting_passage(sentence: str, question: str, hits: list[Hit]) -> int | None:
    """The number (from 1) of the first passage that holds every term the sentence adds; None if none does."""
    added = added_terms(sentence, question)
    if not added or added & SELF_REFERENCE:
        return None
    for number, hit in enumerate(hits, start=1):
        if added <= passage_terms(hit):
            return number
    return None
