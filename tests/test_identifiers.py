"""The dates and numbers a question points at (appliance/answers/identifiers.py)."""

import pytest

from appliance.answers.identifiers import Day, pointers


@pytest.mark.parametrize(
    "text",
    [
        "2025-03-03",
        "Date: 2025-03-03T09:12:00+00:00",
        "3 March 2025",
        "3rd of March, 2025",
        "on March 3, 2025",
        "MAR 3 2025",
        "03/03/2025",
        "3/3/25",
    ],
)
def test_one_day_written_eight_ways_is_one_date(text):
    assert pointers(text).dates == ((Day(2025, 3, 3),),)
    assert pointers("the entry of 3 March 2025").held_by(pointers(text)) == 1


def test_a_date_without_a_year_matches_that_day_of_any_year_and_a_year_must_agree():
    assert pointers("what happened on 12 March?").held_by(pointers("2024-03-12: hold notice sent")) == 1
    assert pointers("what happened on 12 March 2025?").held_by(pointers("2024-03-12: hold notice sent")) == 0
    assert pointers("what happened on 12 March 2025?").held_by(pointers("2025-12-03: hold notice sent")) == 0


def test_slashed_dates_keep_both_readings_when_either_could_be_the_day():
    assert pointers("03/04/2025").dates == ((Day(2025, 4, 3), Day(2025, 3, 4)),)
    assert pointers("25/12/2024").dates == ((Day(2024, 12, 25),),)  # 25 cannot be a month
    assert pointers("4 March 2025").held_by(pointers("03/04/2025")) == 1  # read month first
    assert pointers("3 April 2025").held_by(pointers("03/04/2025")) == 1  # read day first


def test_numbers_are_runs_with_three_digits_or_more_apart_from_a_dates_own_digits():
    found = pointers("Matter HV-2025-0417, ext. 4862, 884.00 GBP, 2 days, on 2025-03-03")
    assert found.numbers == {"2025", "0417", "4862", "884"}
    assert pointers("invoice 0417").held_by(found) == 1
    assert pointers("the 3 March 2025 entry").numbers == frozenset()  # its year belongs to the date


def test_words_that_only_look_like_dates_are_not_dates():
    assert not pointers("we may 3 times a day")  # the verb "may", not the month
    assert not pointers("version 2.1 of the form, 12 beds")  # no month, fewer than three digits
    assert pointers("3 May").dates == ((Day(None, 5, 3),),)
    assert pointers("13/13/2025").dates == ()  # no month 13 either way
