"""autolabel.wording: counts in the number they take, in every layer's messages."""

import pytest
from autolabel.wording import count, duration


class TestCount:
    @pytest.mark.parametrize(("n", "text"), [(0, "0 drives"), (1, "1 drive"), (2, "2 drives"), (21, "21 drives")])
    def test_regular_plural(self, n: int, text: str) -> None:
        assert count(n, "drive") == text

    def test_irregular_plural(self) -> None:
        assert count(1, "class", "classes") == "1 class"
        assert count(11, "class", "classes") == "11 classes"

    def test_noun_of_several_words(self) -> None:
        assert count(1, "annotated frame") == "1 annotated frame"
        assert count(48, "annotated frame") == "48 annotated frames"


class TestDuration:
    @pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (42.4, "42 s"), (99.4, "99 s"), (99.6, "2 min"),
                                                   (420, "7 min"), (5969, "99 min"), (6000, "1 h 40 min"),
                                                   (7500, "2 h 05 min")])
    def test_whole_units(self, seconds: float, text: str) -> None:
        assert duration(seconds) == text
