"""Benchmark tables fold to 80 columns: headers and text cells at spaces, numbers never."""

from __future__ import annotations

from benchmarks._report import TEXT_FOLD_MIN, table_lines

WORKERS = (["case", "workers", "threads each", "seconds", "speed-up", "same labels"],
           [["one drive of 400 frames, in segments of 64", 1, 2, 40.6, 1.0, "yes"],
            ["4 drives of 100 frames", 2, 1, 27.6, 1.52, ""]])


class TestTableLines:
    def test_smoke_narrow_table_unchanged(self) -> None:
        lines = table_lines(["frames", "size", "frames/s"], [[21, "96x72", 6.48]])
        assert lines == ["frames  size   frames/s", "------  -----  --------", "    21  96x72      6.48"]

    def test_wide_table_folds_to_80_columns(self) -> None:
        columns, rows = WORKERS
        lines = table_lines(columns, rows)
        assert max(len(line) for line in lines) <= 80
        assert len(lines) > 2 + len(rows)  # something folded
        text = "\n".join(lines)
        for number in ("40.6", "27.6", "1.52"):  # numbers whole, right-aligned under their header
            assert number in text
        first = next(line for line in lines if line.startswith("one drive"))
        assert first.split()[-4:] == ["2", "40.6", "1.0", "yes"]

    def test_folded_text_keeps_every_word(self) -> None:
        columns, rows = WORKERS
        lines = table_lines(columns, rows, width=60)
        words = " ".join(lines).split()
        for word in "one drive of 400 frames, in segments of 64 threads each same labels".split():
            assert word in words

    def test_text_never_folds_below_its_minimum(self) -> None:
        columns = ["data", *(f"stage {i}" for i in range(12))]
        rows = [["synthetic drives, 3 x 21 frames", *range(100, 112)]]
        lines = table_lines(columns, rows)
        body = lines[next(i for i, line in enumerate(lines) if line.startswith("-")) + 1:]
        data = [line[:TEXT_FOLD_MIN].rstrip() for line in body]
        assert all(len(part) <= TEXT_FOLD_MIN for part in data)
        assert " ".join(data).split() == "synthetic drives, 3 x 21 frames".split()
