"""autolabel.wording: counts in the number they take, in every layer's messages."""

import pytest
from autolabel.wording import count


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
