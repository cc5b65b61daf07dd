"""The dates and numbers a question points at, read the same whichever way a document writes them.

Staff name a record by its date or its number ("Tobias's entry of 3 March 2025", "invoice 0417"), and documents
write the same date in another form ("2025-03-03", "03/03/2025", "March 3, 2025"). A sentence embedding hardly
tells one date or number from another, so among a passage's sentences those that hold what the question points
at are quoted first (`answerability.closest_sentences`).

A date is read from ISO form, "3 March 2025" / "3rd of March", "March 3, 2025" and day/month/year with slashes
(both readings are kept when day and month could be either: "03/04/2025"). A date without a year matches that
day of any year. A number is any other run of letters and digits that holds at least NUMBER_DIGITS digits
("0417", "884", "4862"); the digits of a date are not numbers of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.retrieval.keyword_search import tokens

NUMBER_DIGITS = 3

MONTHS = {
    name: number
    for number, names in enumerate(
        (
            "january jan",
            "february feb",
            "march mar",
            "april apr",
            "may",
            "june jun",
            "july jul",
            "august aug",
            "september sep sept",
            "october oct",
            "november nov",
            "december dec",
        ),
        start=1,
    )
    for name in names.split()
}
_MONTH = "(" + "|".join(sorted(MONTHS, key=len, reverse=True)) + r")\.?"
_ORDINAL = r"(?:st|nd|rd|th)?"
_ISO = re.compile(r"(?<!\d)(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)")
_DAY_MONTH = re.compile(rf"(?<![\w/])(\d{{1,2}}){_ORDINAL}(?:\s+of)?\s+{_MONTH}(?:,?\s+(\d{{4}}))?(?![\w/])", re.I)
_MONTH_DAY = re.compile(rf"(?<![\w/]){_MONTH}\s+(\d{{1,2}}){_ORDINAL}(?:,?\s+(\d{{4}}))?(?![\w/])", re.I)
_SLASHED = re.compile(r"(?<![\d/])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})(?![\d/])")


@dataclass(frozen=True)
class Day:
    year: int | None
    month: int
    day: int

    def matches(self, other: Day) -> bool:
        same_year = self.year is None or other.year is None or self.year == other.year
        return same_year and (self.month, self.day) == (other.month, other.day)


@dataclass(frozen=True)
class Pointers:
    """The dates (each with its other readings) and numbers a text names."""

    dates: tuple[tuple[Day, ...], ...]
    numbers: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.dates or self.numbers)

    def held_by(self, other: Pointers) -> int:
        """How many of these dates and numbers `other` names too."""
        theirs = [day for readings in other.dates for day in readings]
        dates = sum(any(mine.matches(day) for mine in readings for day in theirs) for readings in self.dates)
        return dates + len(self.numbers & other.numbers)


def _day(year: str | None, month: int, day: int) -> Day | None:
    number = None if year is None else int(year) + (2000 if len(year) == 2 else 0)
    return Day(number, month, day) if 1 <= month <= 12 and 1 <= day <= 31 else None


def _a_month(word: str) -> bool:
    return word != "may"  # lower-case "may" is the verb ("we may 3 times"); "May" and "MAY" are the month


def pointers(text: str) -> Pointers:
    """The dates and numbers `text` names (module docstring)."""
    found: list[tuple[Day, ...]] = []
    spans: list[tuple[int, int]] = []

    def add(match: re.Match, *readings: Day | None) -> None:
        kept = tuple(r for r in dict.fromkeys(readings) if r is not None)
        if kept and not any(s < match.end() and match.start() < e for s, e in spans):
            found.append(kept)
            spans.append(match.span())

    for match in _ISO.finditer(text):
        add(match, _day(match[1], int(match[2]), int(match[3])))
    for match in _DAY_MONTH.finditer(text):
        if _a_month(match[2]):
            add(match, _day(match[3], MONTHS[match[2].lower()], int(match[1])))
    for match in _MONTH_DAY.finditer(text):
        if _a_month(match[1]):
            add(match, _day(match[3], MONTHS[match[1].lower()], int(match[2])))
    for match in _SLASHED.finditer(text):
        first, second = int(match[1]), int(match[2])
        add(match, _day(match[3], second, first), _day(match[3], first, second))  # day first, then month first
    pieces, last = [], 0
    for start, end in sorted(spans):  # a date's own digits are not numbers of their own
        pieces += [text[last:start], " "]
        last = end
    rest = "".join([*pieces, text[last:]])
    numbers = frozenset(w.lower() for w in tokens(rest) if sum(c.isdigit() for c in w) >= NUMBER_DIGITS)
    return Pointers(tuple(found), numbers)
