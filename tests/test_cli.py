"""The command line as a user runs it: real subprocesses, exit codes, messages, files written."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import typer.testing
import zarr
import autolabel
from autolabel.cli import label_options
from autolabel.cli.app import COMMAND_MODULES, CommandTable, app, module_commands
from autolabel.storage.store import SCHEMA_VERSION, SequenceStore
from autolabel.tasks.pipeline import LabelSettings
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from PIL import Image

from tests.conftest import random_label, random_rgb, run_cli, save_label, save_rgb

RNG = np.random.default_rng(11)


def _davis(root: Path, sequences: dict[str, int]) -> Path:
    for name, frames in sequences.items():
        for i in range(frames):
            save_rgb(root / "JPEGImages" / name / f"{i:05d}.jpg", random_rgb(RNG))
            save_label(root / "Annotations" / name / f"{i:05d}.png", random_label(RNG, [0, 255]))
    return root


def test_synth_then_info_json(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    done = run_cli("synth", str(store), "--sequences", "2", "--frames", "25", "--size", "48x32", "--window", "21")
    assert done.returncode == 0, done.stderr
    info = run_cli("info", str(store), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["totals"] == {"sequences": 2, "frames": 50, "annotated": 2, "ground_truth": 50,
                              "bytes": data["totals"]["bytes"]}
    assert data["totals"]["bytes"] > 0
    assert [r["annotated_frames"] for r in data["sequences"]] == [[10], [10]]
    assert data["sequences"][0]["stages"] == ["flow/exact", "ingest"]
    assert (data["sequences"][0]["width"], data["sequences"][0]["height"]) == (48, 32)
    table = run_cli("info", str(store))
    assert "synth-0000" in table.stdout and "2 sequences" in table.stdout
    assert "flow: exact" in table.stdout  # stages grouped by kind (autolabel.cli.reports.stage_lines)


def test_info_stage_names_fold_between_names_not_inside() -> None:
    from autolabel.cli.reports import stage_lines

    stages = ["evaluation/warp-inpaint", "evaluation/warp-refine", "flow/dis-fast", "flow/exact", "ingest",
              "labelled", "results/warp-inpaint", "results/warp-refine", "teacher"]
    assert stage_lines(stages).splitlines() == [
        "evaluation: warp-inpaint, warp-refine", "flow: dis-fast, exact", "ingest", "labelled",
        "results: warp-inpaint, warp-refine", "teacher"]


def test_ingest_reports_a_bad_sequence_and_keeps_the_others(tmp_path: Path) -> None:
    root = _davis(tmp_path / "davis", {"good": 3, "broken": 3})
    corrupt = root / "JPEGImages" / "broken" / "00001.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    store = tmp_path / "d.zarr"
    done = run_cli("ingest", "davis", str(root), "--store", str(store), "--window", "3")
    assert done.returncode == 1
    assert "ingested 1 sequence " in done.stdout and "failed 1" in done.stdout
    assert "broken" in done.stdout and "00001.jpg" in done.stdout.replace("\n", "")
    st = SequenceStore.open(str(store))
    assert st.sequence_ids() == ["good"] and st.incomplete_ids() == []
    assert st.sequence("good").annotated.tolist() == [False, True, False]
    again = run_cli("ingest", "davis", str(root), "--store", str(store), "--sequence", "good")
    assert again.returncode == 0 and "skipped 1" in again.stdout


def test_a_damaged_video_fails_alone_with_its_message_whole(tmp_path: Path) -> None:
    """Nothing printed is read as rich markup: ``[video]`` in the install hint used to vanish as a
    style tag, in the error line and in the failures table; FFmpeg's own complaint stays off stderr."""
    import cv2

    videos = tmp_path / "videos"
    videos.mkdir()
    writer = cv2.VideoWriter(str(videos / "good.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    for i in range(4):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
    writer.release()
    (videos / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # an mp4 without its moov atom
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["bg", "obj"], "palette": [[0, 0, 0], [255, 0, 0]]}))
    done = run_cli("ingest", "folder", str(videos), "--store", str(tmp_path / "v[1].zarr"),
                   "--classes", str(tmp_path / "classes.json"), columns=80)
    assert done.returncode == 1 and "ingested 1 sequence" in done.stdout, done.stdout + done.stderr
    assert "moov atom" not in done.stderr, done.stderr
    try:
        import av  # noqa: F401
        hint = "cannot decode video"
    except ImportError:
        hint = "pip install 'autolabel[video]'"
    assert f"failed bad: {videos / 'bad.mp4'}: " in done.stderr and hint in done.stderr.replace("\n", " "), done.stderr
    assert hint in " ".join(line.strip("│ ") for line in done.stdout.splitlines()), done.stdout
    assert SequenceStore.open(str(tmp_path / "v[1].zarr")).sequence_ids() == ["good"]


def test_paths_with_brackets_print_whole(tmp_path: Path) -> None:
    done = run_cli("info", str(tmp_path / "runs[onnx]" / "s.zarr"))
    assert done.returncode == 2 and f"no autolabel store at '{tmp_path}/runs[onnx]/s.zarr'" in \
        done.stderr.replace("\n", ""), done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["ingest", "davis", "{tmp}", "--store", "{tmp}/x.zarr"], "JPEGImages"),
    (["ingest", "kitty", "{tmp}", "--store", "{tmp}/x.zarr"], "unknown dataset layout 'kitty'"),
    (["ingest", "davis", "{tmp}", "--store", "{tmp}/x.zarr", "--window", "4"], "odd size"),
    (["info", "{tmp}/missing.zarr"], "no autolabel store"),
    (["synth", "{tmp}/s.zarr", "--size", "big"], "--size must look like"),
    # output folders inside a local store would sit among its groups and travel with every copy
    (["export", "{tmp}/s.zarr", "--method", "gt", "--out", "{tmp}/s.zarr/png"], "--out {tmp}/s.zarr/png is inside "
                                                                                "the store {tmp}/s.zarr; write it"),
    (["export", "{tmp}/s.zarr/", "--method", "gt", "--out", "{tmp}/s.zarr"], "is inside the store"),
    (["review", "{tmp}/s.zarr", "--out", "{tmp}/s.zarr/queue"], "--out {tmp}/s.zarr/queue is inside the store"),
    (["suggest-keyframes", "{tmp}/s.zarr", "--out", "{tmp}/s.zarr/cvat"], "is inside the store"),
    (["evaluate", "{tmp}/s.zarr", "--method", "motion-only", "--plot", "{tmp}/s.zarr/p"], "--plot {tmp}/s.zarr/p is "
                                                                                          "inside the store"),
    (["label", "{tmp}/s.zarr", "--method", "motion-only", "--export", "{tmp}/s.zarr/e"], "--export {tmp}/s.zarr/e "
                                                                                         "is inside the store"),
    (["run", "{tmp}/s.zarr", "--method", "motion-only", "--export", "{tmp}/s.zarr/e"], "is inside the store"),
])
def test_clear_errors_exit_non_zero(tmp_path: Path, args: list[str], message: str) -> None:
    done = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message.format(tmp=tmp_path) in done.stderr.replace("\n", ""), done.stderr
    assert "Traceback" not in done.stderr


def test_store_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    root = _davis(tmp_path / "davis", {"a": 2})
    store = tmp_path / "d.zarr"
    assert run_cli("ingest", "davis", str(root), "--store", str(store)).returncode == 0
    zarr.open_group(str(store), mode="r+").attrs["schema_version"] = 7
    done = run_cli("ingest", "davis", str(root), "--store", str(store))
    assert done.returncode == 2 and "schema version 7" in done.stderr


def test_export_gt_writes_index_colour_and_overlay(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert run_cli("synth", str(store), "--sequences", "1", "--frames", "3", "--size", "40x30").returncode == 0
    out = tmp_path / "export"
    done = run_cli("export", str(store), "--method", "gt", "--out", str(out), "--overlay")
    assert done.returncode == 0, done.stderr
    seq = SequenceStore.open(str(store)).sequence("synth-0000")
    index = np.asarray(Image.open(out / "synth-0000" / "index" / "000001.png"))
    np.testing.assert_array_equal(index, seq.ground_truth(1))
    colour = np.asarray(Image.open(out / "synth-0000" / "color" / "000001.png").convert("RGB"))
    np.testing.assert_array_equal(colour, seq.store.classes.colour_lut()[seq.ground_truth(1)])
    blended = np.asarray(Image.open(out / "synth-0000" / "overlay" / "000001.png"))
    # class colours at a visible alpha (0.6), class boundaries drawn in white
    edge = np.zeros(index.shape, bool)
    edge[:, :-1] |= index[:, :-1] != index[:, 1:]
    edge[:-1, :] |= index[:-1, :] != index[1:, :]
    assert edge.any() and (blended[edge] == 255).all()
    expected = (0.4 * seq.frame(1).astype(float) + 0.6 * colour).round()
    assert np.abs(blended.astype(float) - expected)[~edge].max() <= 1
    assert sorted(p.name for p in (out / "synth-0000" / "index").iterdir()) == ["000000.png", "000001.png", "000002.png"]


@pytest.mark.parametrize("args", [
    ["export", "--out", "o"], ["export", "--out", "o", "--format", "folder"],
    ["export", "--out", "o", "--format", "cvat-mask"], ["review", "--out", "o"], ["suggest-keyframes"],
], ids=lambda a: " ".join(a[:1] + a[3:]))
def test_a_method_not_run_yet_is_one_error_not_a_failure_per_sequence(tmp_path: Path, args: list[str]) -> None:
    store = tmp_path / "s.zarr"
    assert run_cli("synth", str(store), "--sequences", "2", "--frames", "2", "--size", "32x24").returncode == 0
    done = run_cli(args[0], str(store), "--method", "warp-refine", *args[1:], cwd=tmp_path)
    action = {"export": "export", "review": "review", "suggest-keyframes": "suggest keyframes for"}[args[0]]
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "failed" not in done.stderr, done.stderr
    assert f"nothing to {action}: no selected sequence of store {str(store)!r} (2 sequences) has results of " \
           f"warp-refine; run `autolabel label {store} --method warp-refine` first" in done.stderr.replace("\n", "")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["evaluate", "--method", "motion-only", "--method", "warp-refin"], ["evaluate", "--method", "gt"],
    ["export", "--method", "warp-refin", "--out", "o"], ["review", "--method", "gt", "--out", "o"],
    ["suggest-keyframes", "--method", "motion"],
], ids=lambda a: " ".join(a[:1] + a[-1:]))
def test_a_name_that_is_no_method_says_so_with_the_known_ones(tmp_path: Path, args: list[str]) -> None:
    """These used to say 'run `autolabel label --method gt` first', or (evaluate with a valid method
    beside the typo) print a table and a line that the typo has no results."""
    store = tmp_path / "s.zarr"
    assert run_cli("synth", str(store), "--sequences", "1", "--frames", "2", "--size", "32x24").returncode == 0
    done = run_cli(args[0], str(store), *args[1:], cwd=tmp_path)
    text = done.stderr.replace("\n", " ")
    assert done.returncode == 2 and "mIoU" not in done.stdout and "Traceback" not in text, done.stdout + text
    bad = [a for a in args if a in ("warp-refin", "gt", "motion")][-1]
    assert f"--method: unknown propagation method {bad!r}; known: motion-only, semantic-only, warp-inpaint, " \
           f"warp-refine{', or ' + repr('gt') + ' for the stored labels' if args[0] == 'export' else ''}" in text, text
    assert not (tmp_path / "o").exists()


def test_export_names_the_sequence_without_results_and_exports_the_others(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert run_cli("synth", str(store), "--sequences", "2", "--frames", "3", "--size", "32x24").returncode == 0
    done = run_cli("label", str(store), "--method", "motion-only", "--sequence", "synth-0001", "--flow", "dis-fast",
                   "--workers", "1", "--no-estimate")
    assert done.returncode == 0, done.stderr
    done = run_cli("export", str(store), "--method", "motion-only", "--out", str(tmp_path / "o"))
    assert done.returncode == 1 and "exported 3 frames of 1 sequence" in done.stdout, done.stdout
    assert "failed synth-0000: sequence 'synth-0000' has no results of 'motion-only' (methods labelled: none " \
           "yet); run `autolabel label" in done.stderr.replace("\n", " "), done.stderr
    assert len(list((tmp_path / "o" / "synth-0001" / "index").iterdir())) == 3
    assert not (tmp_path / "o" / "synth-0000").exists()


def test_evaluate_without_results_is_an_error_not_an_empty_table(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert run_cli("synth", str(store), "--sequences", "2", "--frames", "3", "--size", "32x24").returncode == 0
    done = run_cli("evaluate", str(store), "--method", "warp-refine", "--method", "motion-only")
    assert done.returncode == 2 and "mIoU" not in done.stdout, done.stdout
    assert ("nothing to evaluate: no selected sequence of store" in done.stderr.replace("\n", "")
            and "(2 sequences) has results of warp-refine or motion-only; run `autolabel label"
            in done.stderr.replace("\n", "")), done.stderr


def test_demo_runs_the_full_job_through_the_flows(tmp_path: Path) -> None:
    done = run_cli("demo", "--out", str(tmp_path / "demo"), "--sequences", "2", "--frames", "23", "--size", "64x48",
                   "--teacher-steps", "5", "--refiner-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    for step in ("train-teacher", "train-refiner", "label-sequence", "warp-refine: per sequence", "d=10"):
        assert step in out, step
    assert (tmp_path / "demo" / "teacher.pt").is_file() and (tmp_path / "demo" / "refiner.pt").is_file()
    overlays = sorted((tmp_path / "demo" / "export").glob("*/overlay/*.png"))
    assert len(overlays) == 2 * 21  # every frame within K = 10 of the window centre


def test_flow_train_label_evaluate_chain(tmp_path: Path) -> None:
    store = str(tmp_path / "s.zarr")
    assert run_cli("synth", store, "--sequences", "1", "--frames", "23", "--size", "64x48", "--window", "21").returncode == 0
    done = run_cli("flow", store, "--flow", "dis-fast", "--workers", "1")
    assert done.returncode == 0 and "computed for 1 sequence," in done.stdout, done.stderr
    teacher = tmp_path / "t.pt"
    done = run_cli("train-teacher", "--store", store, "--out", str(teacher), "--arch", "unet-tiny",
                   "--max-steps", "3", "--batch-size", "1", "--crop", "64")
    assert done.returncode == 0 and teacher.is_file(), done.stderr
    assert "training unet-tiny on 1 annotated frame from 1 sequence in 1 store" in done.stdout
    assert "3/3 (100%" in done.stderr  # without a terminal, progress comes as plain lines
    assert "mean loss of the last 3 steps" in done.stdout  # says what the closing loss is
    for method in ("motion-only", "semantic-only", "warp-inpaint"):
        done = run_cli("label", store, "--method", method, "--teacher", str(teacher), "--flow", "dis-fast",
                       "--workers", "1")
        assert done.returncode == 0 and "labelled 1 sequence (" in done.stdout, done.stderr
    again = run_cli("label", store, "--method", "warp-inpaint", "--teacher", str(teacher), "--flow", "dis-fast")
    assert "skipped 1 (already done)" in again.stdout
    out = tmp_path / "eval.json"
    done = run_cli("evaluate", store, "--method", "motion-only", "--method", "warp-inpaint", "--json", str(out))
    assert done.returncode == 0 and "d=10" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"motion-only", "warp-inpaint"}
    m = report["methods"]["warp-inpaint"]
    assert {"miou_mean", "miou_by_distance", "per_class_iou", "per_sequence_miou", "frames_scored"} <= set(m)
    assert m["frames_scored"] == 20 and list(m["per_sequence_miou"]) == ["synth-0000"]
    exported = run_cli("export", store, "--method", "warp-inpaint", "--out", str(tmp_path / "x"))
    assert exported.returncode == 0 and len(list((tmp_path / "x" / "synth-0000" / "index").iterdir())) == 21
    refiner = tmp_path / "r.pt"
    done = run_cli("train-refiner", "--store", store, "--teacher", str(teacher), "--out", str(refiner), "--arch",
                   "refine-tiny", "--steps", "2", "--crop", "32", "--max-cycle", "2", "--flow", "dis-fast")
    assert done.returncode == 0 and refiner.is_file() and "4 cycles" in done.stdout, done.stderr
    done = run_cli("label", store, "--method", "warp-refine", "--teacher", str(teacher), "--refiner", str(refiner),
                   "--flow", "dis-fast")
    assert done.returncode == 0, done.stderr  # the store's 23 frames, with the pace from the command's start
    assert re.search(r"warp-refine: labelled 1 sequence \(23 frames, \d+\.\d frames/s\), skipped 0 \(already "
                     r"done\), failed 0 in \d+\.\d s", done.stdout), done.stdout
    done = run_cli("evaluate", store, "--method", "warp-inpaint", "--method", "warp-refine", "--plot",
                   str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    for name in ("miou_by_distance.png", "per_class_iou.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3-frame store made once in-process (`synth` itself is tested above); the error cases leave it as is."""
    store = str(tmp_path_factory.mktemp("tiny") / "s.zarr")
    write_synthetic_store(store, drive_configs(1, SyntheticConfig(width=32, height=24, frames=3)))
    return store


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "warp-inpaint"], "needs a teacher checkpoint: pass --teacher"),
    (["--method", "motion-only", "--max-distance", "0"], "must be 1..127 frames"),
    (["--method", "motion-only", "--max-distance", "1000"], "must be 1..127 frames"),
    (["--method", "semantic-only", "--teacher", "{tmp}/none.pt"], "none.pt does not exist; make one with"),
    (["--method", "motion-only", "--segment-frames", "16", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_label_errors(tiny_store: str, tmp_path: Path, args: list[str], message: str) -> None:
    done = run_cli("label", tiny_store, *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2 and message in done.stderr.replace("\n", ""), done.stderr


def test_run_refuses_warp_refine_without_a_refiner(tmp_path: Path) -> None:
    done = run_cli("run", str(tmp_path / "s.zarr"), "--teacher", str(tmp_path / "t.pt"), "--method", "warp-refine")
    assert done.returncode == 2
    assert "needs a refiner checkpoint" in done.stderr.replace("\n", "") and "Traceback" not in done.stderr


# runs the CLI in this process and prints which heavy packages it loaded
LOADED_BY = """
import sys
from autolabel.cli import main
sys.argv = ["autolabel", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print("LOADED", code, sorted(m for m in ("torch", "prefect") if m in sys.modules))
"""


def _loaded_by(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", LOADED_BY, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100", "NO_COLOR": "1"})
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("LOADED")]
    _, code, loaded = line.split(" ", 2)
    return int(code), json.loads(loaded.replace("'", '"'))


class TestCommandTable:
    """Each command's module is imported when that command runs (``autolabel.cli.app.CommandTable``)."""

    def test_every_module_registers_exactly_its_commands(self) -> None:
        modules = set(COMMAND_MODULES.values())
        registered = {name: module for module in modules for name in module_commands(module)}
        assert registered == COMMAND_MODULES

    @pytest.mark.parametrize("command", ["ingest", "info", "synth", "export", "verify"])
    def test_data_commands_start_without_torch(self, command: str) -> None:
        assert _loaded_by(command, "--help") == (0, [])

    def test_a_data_command_runs_without_torch(self, tmp_path: Path) -> None:
        store = str(tmp_path / "s.zarr")
        write_synthetic_store(store, drive_configs(1, SyntheticConfig(width=32, height=32, frames=4)))
        assert _loaded_by("info", store) == (0, [])
        assert _loaded_by("verify", store) == (0, [])

    def test_a_labelling_command_loads_what_it_needs(self) -> None:
        assert _loaded_by("label", "--help") == (0, ["torch"])

    def test_help_lists_every_command_in_order(self) -> None:
        done = run_cli("--help")
        assert done.returncode == 0
        listed = [line.split()[0] for line in done.stdout.splitlines()
                  if line.startswith("  ") and line.split() and line.split()[0] in COMMAND_MODULES]
        assert listed == list(COMMAND_MODULES)

    def test_help_at_80_columns_cuts_no_option_name_and_no_summary(self) -> None:
        """Every command's help fits 80 columns with each option's name whole (a table layout cut
        ``--inpaint-confidence`` to ``--inpaint-confiden…``) and ``--help`` lists whole summaries."""
        root = run_cli("--help", columns=80)
        listing = root.stdout.split("Commands:")[1]
        assert root.returncode == 0 and "..." not in listing and "…" not in listing, root.stdout
        runner = typer.testing.CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})
        for name in COMMAND_MODULES:
            done = runner.invoke(app, [name, "--help"], prog_name="autolabel")
            assert done.exit_code == 0, done.output
            assert max(len(line) for line in done.stdout.splitlines()) <= 80, done.stdout
            assert "…" not in done.stdout, done.stdout
            command = module_commands(COMMAND_MODULES[name])[name]
            for param in command.params:
                for flag in [*param.opts, *param.secondary_opts]:
                    if flag.startswith("--"):
                        assert flag in done.stdout, f"{name}: {flag} not shown whole"

    def test_version_is_printed_without_loading_a_command(self) -> None:
        done = run_cli("--version")
        assert done.returncode == 0 and done.stdout.strip() == \
            f"autolabel {autolabel.__version__} (store schema {SCHEMA_VERSION})"
        assert _loaded_by("--version") == (0, [])

    def test_a_misspelt_command_is_answered_with_a_suggestion(self) -> None:
        done = run_cli("lable", "x")
        assert done.returncode == 2 and "No such command 'lable'. Did you mean 'label'?" in done.stderr

    def test_table_behaves_as_a_mapping(self) -> None:
        table = CommandTable({"info": "data_commands"})
        assert list(table) == ["info"] and "info" in table and "label" not in table
        with pytest.raises(KeyError):
            table["label"]
        assert table["info"].name == "info"
        table["extra"] = table["info"]
        assert list(table) == ["info", "extra"] and len(table) == 2
        del table["info"]
        assert list(table) == ["extra"]


class TestSharedLabelOptions:
    """``label`` and ``run`` take one list of options that make their LabelSettings."""

    def test_label_and_run_offer_the_same_options_after_method(self) -> None:
        shared = list(inspect.signature(label_options._label_options).parameters)
        for name in ("label", "run"):
            params = [p.name for p in module_commands(COMMAND_MODULES[name])[name].params]
            at = params.index("method") + 1
            assert params[at:at + len(shared)] == shared and "settings" not in params, name

    def test_the_command_gets_the_settings_the_options_make(self) -> None:
        seen: list[Any] = []

        @label_options.takes_label_settings
        def command(store: str, method: str = "warp-inpaint", *, settings: LabelSettings) -> None:
            seen.append((store, method, settings))

        app = typer.Typer(add_completion=False)
        app.command()(command)
        app.command("other")(lambda: None)
        result = typer.testing.CliRunner().invoke(app, ["command", "s.zarr", "--teacher", "t.pt", "--tau", "12",
                                                        "--max-distance", "5", "--no-estimate"])
        assert result.exit_code == 0, result.output
        ((store, method, settings),) = seen
        assert (store, method, settings.teacher, settings.max_distance) == ("s.zarr", "warp-inpaint", "t.pt", 5)
        assert settings.propagation.tau == 12 and not settings.estimate.enabled

    def test_a_command_without_method_and_settings_is_refused(self) -> None:
        with pytest.raises(TypeError, match="needs 'method' and 'settings'"):
            label_options.takes_label_settings(lambda store: None)


class TestPrintItems:
    """Lists such as `label`'s time per stage fold between items, never inside one."""

    @staticmethod
    def _printed(monkeypatch: pytest.MonkeyPatch, width: int, head: str, items: list[str]) -> list[str]:
        import io

        from rich.console import Console

        from autolabel.cli import console as console_module

        out = io.StringIO()
        monkeypatch.setattr(console_module, "console", Console(file=out, width=width, color_system=None))
        console_module.print_items(head, items)
        return out.getvalue().splitlines()

    def test_short_list_on_one_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert self._printed(monkeypatch, 80, "time per stage:", ["flow 1.5 s", "teacher 3.8 s"]) == \
            ["time per stage: flow 1.5 s, teacher 3.8 s"]

    def test_folds_between_items_within_the_width(self, monkeypatch: pytest.MonkeyPatch) -> None:
        items = ["flow/dis-fast 3.9 s", "teacher 12.1 s", "results/warp-refine 26.5 s", "evaluation 1.9 s"]
        lines = self._printed(monkeypatch, 60, "segment jobs, time per stage summed over jobs:", items)
        assert len(lines) > 1 and all(len(line) <= 60 for line in lines)
        assert lines[1].startswith("  ")
        for item in items:  # every item whole on one line
            assert any(item in line for line in lines), item


class TestPrintSection:
    """The demo's step titles: in a rule where they fit, never cut where they do not."""

    @staticmethod
    def _printed(monkeypatch: pytest.MonkeyPatch, width: int, title: str) -> list[str]:
        import io

        from rich.console import Console

        from autolabel.cli import console as console_module

        out = io.StringIO()
        monkeypatch.setattr(console_module, "console", Console(file=out, width=width, color_system=None))
        console_module.print_section(title)
        return out.getvalue().splitlines()

    def test_a_short_title_sits_in_the_rule(self, monkeypatch: pytest.MonkeyPatch) -> None:
        (line,) = self._printed(monkeypatch, 80, "5. results")
        assert len(line) == 80 and " 5. results " in line and line.startswith("─")

    def test_a_long_title_is_folded_under_the_rule_not_cut(self, monkeypatch: pytest.MonkeyPatch) -> None:
        title = "4. label every drive with warp-refine, evaluate, publish the dashboard (flow autolabel)"
        lines = self._printed(monkeypatch, 80, title)
        assert set(lines[0]) == {"─"} and all(len(line) <= 80 for line in lines)
        assert " ".join(line.strip() for line in lines[1:]) == title and "…" not in "".join(lines)


class TestLogProgress:
    """Progress in a log: a line at each quarter of the way, with the true share done."""

    @staticmethod
    def _lines(total: int, steps: int) -> list[str]:
        import io

        from rich.console import Console

        from autolabel.cli.console import LogProgress

        out = io.StringIO()
        progress = LogProgress(Console(file=out, width=80, color_system=None))
        task = progress.add_task("train", total=total)
        for _ in range(steps):
            progress.advance(task)
        return out.getvalue().splitlines()

    def test_a_line_per_quarter_ending_at_the_total(self) -> None:
        lines = self._lines(104, 104)
        assert [line.split(" (")[0] for line in lines] == [  # started, then each quarter
            "train: 1/104", "train: 26/104", "train: 52/104", "train: 78/104", "train: 104/104"]
        assert lines[-1].startswith("train: 104/104 (100%,")

    def test_time_left_between_the_first_and_the_last_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each item takes 3 s: at 26/104 about 234 s are left, said in minutes; none on the first line
        (one item and the start-up are no pace) nor on the last."""
        import io

        from rich.console import Console

        import autolabel.cli.console as console_module

        now = [0.0]
        monkeypatch.setattr(console_module.time, "perf_counter", lambda: now[0])
        out = io.StringIO()
        progress = console_module.LogProgress(Console(file=out, width=80, color_system=None))
        task = progress.add_task("train", total=104)
        for _ in range(104):
            now[0] += 3.0
            progress.advance(task)
        lines = out.getvalue().splitlines()
        assert "left" not in lines[0] and "left" not in lines[-1], lines
        assert lines[1] == "train: 26/104 (25%, 78 s, ~4 min left)", lines
        assert lines[3] == "train: 78/104 (75%, 4 min, ~78 s left)", lines
        now[0] = 0.0
        fast = progress.add_task("fast", total=8)
        for _ in range(8):
            now[0] += 0.01
            progress.advance(fast)
        assert out.getvalue().splitlines()[-3] == "fast: 4/8 (50%, 0 s, <1 s left)"
        assert lines[-1] == "train: 104/104 (100%, 5 min)", lines

    def test_the_true_share_not_the_quarter(self) -> None:
        lines = self._lines(3, 3)
        assert [line.split(",")[0] for line in lines] == ["train: 1/3 (33%", "train: 2/3 (66%", "train: 3/3 (100%"]
        assert "(25%" not in "".join(lines)


class TestInterruptedMessage:
    """What Ctrl-C prints (the end-to-end cases are in tests/test_faults.py)."""

    def test_each_store_writing_command_says_how_to_go_on(self) -> None:
        from autolabel.cli.app import interrupted_message

        assert "the same command goes on from there" in interrupted_message(["label", "s.zarr", "--method", "x"])
        assert "the same command goes on from there" in interrupted_message(["flow", "s.zarr"])
        assert "the same command goes on from there" in interrupted_message(["run", "s.zarr", "--method", "x"])
        assert "the same command ingests the rest" in interrupted_message(["ingest", "apollo", "inbox"])
        assert "no checkpoint was written" in interrupted_message(["train-refiner", "--store", "s"])
        assert "the same command writes the rest" in interrupted_message(["synth", "s.zarr", "--frames", "9"])

    def test_other_commands_and_options_first(self) -> None:
        from autolabel.cli.app import interrupted_message

        assert interrupted_message(["evaluate", "s.zarr"]) == "interrupted (Ctrl-C)"
        assert interrupted_message([]) == "interrupted (Ctrl-C)"
        assert interrupted_message(["--version"]) == "interrupted (Ctrl-C)"
