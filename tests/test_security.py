"""Hostile files: archives and pickles that try to run code, dataset files that try to read or write elsewhere.

Every case asserts the exit code, the first line of the message, and that the attack left no trace.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants
from PIL import Image

from cops_hf.cli import main
from cops_hf.conversion import read_torchscript_tensors
from cops_hf.data import DataError, load_meta_dataset, make_record, validate_meta_dataset, write_meta_json
from cops_hf.file_utils import FORMULA_TRIGGERS, formula_safe_cell
from cops_hf.image_utils import MAX_URL_BYTES_ENV, ImageLoadError, load_image
from cops_hf.official import MAX_DOWNLOAD_ATTEMPTS, OfficialReleaseError, download_official_checkpoint
from cops_hf.processing_cops import CoPSProcessor
from tests.data_fakes import write_image, write_mask
from tests.hub_server import LoopbackServer, StaticFileServer, git_blob_id
from tests.test_bad_inputs import write_png_header
from tests.test_conversion import FIXTURE_NAMES, load_fixture, reference_weights
from tests.tiny_models import tiny_model


def _first_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The first line of the CLI's error message (progress bars on stderr are not part of it)."""
    return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("cops-hf "))


# ---------------------------------------------------------------- archives and pickles that run code


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def _pickle_string(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _payloads(marker: Path) -> dict[str, bytes]:
    """data.pkl streams that run `_marker_code` when unpickled by pickle itself, through each opcode family."""
    code = _pickle_string(_marker_code(marker))
    module = b"\x80\x02c__torch__\nCLIP\n)\x81}("  # a scripted CLIP module whose state dict starts here
    return {
        "global-reduce": module + _pickle_string("weight") + b"cbuiltins\nexec\n" + code + b"\x85Rub.",
        "stack-global": b"\x80\x04" + _pickle_string("builtins") + _pickle_string("exec") + b"\x93" + code + b"\x85R.",
        "inst": b"(" + code + b"ibuiltins\nexec\n.",
        "hooks-argument": (
            module + _pickle_string("weight") + b"ctorch._utils\n_rebuild_tensor_v2\n(cos\nsystem\n"
            + _pickle_string(f"touch {marker}") + b"\x85RK\x00)))\x89N\x85tRub."
        ),
    }  # fmt: skip


class _PlainUnpickler(pickle.Unpickler):
    """pickle's own unpickler, with the scripted classes as empty classes: what trusting the archive would do."""

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("__torch__"):
            return type(name, (), {})
        return super().find_class(module, name)

    def persistent_load(self, pid: object) -> None:
        return None


def _scripted_archive(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A TorchScript archive whose modules hold `state` (dotted names) as parameters, like OpenAI's CLIP files."""

    class Holder(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs

    root = Holder()
    for key, tensor in state.items():
        owner = root
        *parents, leaf = key.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, Holder())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def _replace_member(archive_path: Path, suffix: str, content: bytes) -> None:
    with zipfile.ZipFile(archive_path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(archive_path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, content if name.endswith(suffix) else data)


@pytest.mark.parametrize("kind", ["global-reduce", "stack-global", "inst", "hooks-argument"])
def test_malicious_torchscript_archive_runs_nothing(tmp_path, capsys, kind):
    marker = tmp_path / "pwned.txt"
    payload = _payloads(marker)[kind]
    if kind != "hooks-argument":  # the payload is live: plain pickle runs it (os.system is left unproven here)
        _PlainUnpickler(io.BytesIO(payload)).load()
        assert marker.read_text() == "pwned"
        marker.unlink()
    archive = _scripted_archive(tmp_path / "evil.pt", {"visual.proj": torch.ones(2, 2)})
    _replace_member(archive, "/data.pkl", payload)

    code = main(["convert", "--clip", str(archive), "--output", str(tmp_path / "out")])

    assert code == 2
    first = _first_error_line(capsys)
    assert first.startswith(f"cops-hf convert: error: '{archive}' is a TorchScript archive that refers to ")
    assert first.endswith("only tensors are read from CLIP archives, so it is refused.")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_scripted_code_is_never_compiled(tmp_path):
    """The archive's code/ files are not read: a __setstate__ that would rewrite the weights changes nothing."""
    state = {"visual.proj": torch.arange(6.0).reshape(2, 3), "ln_final.weight": torch.ones(3, dtype=torch.float16)}
    archive = _scripted_archive(tmp_path / "clip.pt", state)
    hostile_code = "def __setstate__(self, state):\n    import os\n    os.system('touch pwned')\n"
    _replace_member(archive, "code/__torch__.py", hostile_code.encode())

    tensors = read_torchscript_tensors(archive)

    assert set(tensors) == set(state)
    for name, tensor in state.items():
        # Exact: tensors are read back from the archive's bytes, never computed.
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor)


def _fixture_clip() -> dict[str, torch.Tensor]:
    meta, tensors = load_fixture(FIXTURE_NAMES[0])
    return reference_weights(meta, tensors)[0]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (_marker_code(self.marker),)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("flag", ["--clip", "--checkpoint"])
def test_malicious_pickles_are_refused(tmp_path, capsys, flag, zip_format):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / ("evil.pth" if flag == "--checkpoint" else "evil.pt")
    torch.save({"prompt_learner": {"t_n": _RunsCode(marker)}}, evil, _use_new_zipfile_serialization=zip_format)
    clip = evil if flag == "--clip" else _scripted_archive(tmp_path / "clip.pt", _fixture_clip())
    argv = ["convert", "--clip", str(clip), "--output", str(tmp_path / "out")]

    code = main(argv + (["--checkpoint", str(evil)] if flag == "--checkpoint" else []))

    what = "CoPS checkpoint" if flag == "--checkpoint" else "CLIP file"
    assert code == 2
    first = _first_error_line(capsys)
    assert first.startswith(f"cops-hf convert: error: {what} '{evil}' was refused: it holds more than tensors (")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- dataset files that point elsewhere


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_model")
    model = tiny_model()
    model.save_pretrained(directory)
    CoPSProcessor.for_image_size(model.config.image_size).save_pretrained(directory)
    return directory


def _dataset(root: Path, escaping_record: dict | None = None, category: str = "bottle") -> Path:
    """A valid one-category dataset (2 normal, 2 anomalous with masks), plus `escaping_record` if given."""
    records = []
    for index in range(4):
        label = index % 2
        image = f"{category}/{index}.png"
        write_image(root / image, size=(16, 16), value=60 + 40 * index)
        mask = ""
        if label:
            mask = f"{category}/{index}_mask.png"
            write_mask(root / mask, size=(16, 16))
        records.append(make_record(image, cls_name=category, anomaly=label, specie_name="crack" if label else "good",
                                   mask_path=mask))  # fmt: skip
    if escaping_record is not None:
        records.append({**escaping_record, "cls_name": category})
    write_meta_json(root, {"train": {category: records}, "test": {category: records}})
    return root


def _outside_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """(path as meta.json writes it, the same form for a file that does not exist) per way of leaving the root."""
    secret = write_image(tmp_path / "secret" / "real.png", size=(16, 16))
    root = tmp_path / "suite" / "mvtec"
    (root / "bottle").mkdir(parents=True)
    os.symlink(secret, root / "bottle" / "link.png")
    os.symlink(tmp_path / "secret" / "gone.png", root / "bottle" / "dangling.png")
    return {
        "relative": ("../../secret/real.png", "../../secret/gone.png"),
        "absolute": (str(secret), str(tmp_path / "secret" / "gone.png")),
        "symlink": ("bottle/link.png", "bottle/dangling.png"),
    }


def _commands(model_dir: Path, root: Path, output: Path) -> dict[str, list[str]]:
    common = ["--model", str(model_dir), "--output", str(output)]
    return {
        "data": ["data", "validate", str(root)],
        "evaluate": ["evaluate", "--data", str(root), *common, "--batch-size", "4"],
        "calibrate": ["calibrate", "--data", str(root), *common],
        "train": ["train", "--random-clip", "tiny", "--data", str(root), "--output", str(output), "--epochs", "1"],
        "benchmark": ["benchmark", "--data-root", str(root.parent), *common],
    }


_ESCAPING_RECORD = {"mask_path": "bottle/1_mask.png", "specie_name": "crack", "anomaly": 1}


def _escape_message(root: Path, kind: str) -> str:
    return f"{kind} path leads outside the dataset root {root}; meta.json paths must stay inside it"


@pytest.mark.parametrize("command", ["data", "evaluate", "calibrate", "train", "benchmark"])
def test_every_command_refuses_paths_outside_the_root(tmp_path, capsys, model_dir, command):
    existing, missing = _outside_paths(tmp_path)["relative"]
    root = tmp_path / "suite" / "mvtec"
    outputs = tmp_path / "outputs"
    first_lines = []
    for target in (existing, missing):
        _dataset(root, {**_ESCAPING_RECORD, "img_path": target})
        code = main(_commands(model_dir, root, outputs)[command])
        if command == "data":  # validation reports every problem on stdout and exits 1
            assert code == 1
            report = capsys.readouterr().out.splitlines()
            assert report[0].endswith("5 records in 1 categories, 4 valid (2 anomalous, pixel-level), 1 problems")
            first = report[1]
            assert first.startswith(f"  - {target}: {_escape_message(root, 'image')}")
        else:
            assert code == 2
            first = _first_error_line(capsys)
            split = "train" if command == "train" else "test"
            assert first.startswith(
                f"cops-hf {command}: error: {root / 'meta.json'} [{split}]: 1 invalid of 5 records, first {target}: "
                f"{_escape_message(root, 'image')}"
            ), first
        first_lines.append(first.replace(target, "PATH"))
    # A file outside the root that exists and one that does not give the same message: nothing is revealed.
    assert first_lines[0] == first_lines[1]
    assert not outputs.exists()


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
@pytest.mark.parametrize("field", ["img_path", "mask_path"])
def test_each_way_out_of_the_root_is_refused(tmp_path, how, field):
    existing, missing = _outside_paths(tmp_path)[how]
    root = tmp_path / "suite" / "mvtec"
    kind = "image" if field == "img_path" else "mask"
    reasons = []
    for target in (existing, missing):
        _dataset(root, {**_ESCAPING_RECORD, "img_path": "bottle/1.png", field: target})
        report = validate_meta_dataset(root)
        assert [(problem.path, problem.location) for problem in report.problems] == [(target, "test/bottle[4]")]
        assert report.problems[0].reason.startswith(_escape_message(root, kind))
        reasons.append(report.problems[0].reason)
        with pytest.raises(DataError, match="first .*leads outside the dataset root"):
            load_meta_dataset(root, split="train")
        assert len(load_meta_dataset(root, skip_invalid=True)) == 4
    assert reasons[0] == reasons[1]


def test_trusted_paths_outside_the_root_are_an_explicit_choice(tmp_path, capsys, model_dir, monkeypatch):
    existing, _ = _outside_paths(tmp_path)["absolute"]
    record = {"img_path": existing, "mask_path": "", "specie_name": "good", "anomaly": 0}
    root = _dataset(tmp_path / "suite" / "mvtec", record)
    assert main(["data", "validate", str(root)]) == 1
    capsys.readouterr()
    monkeypatch.setenv("COPS_HF_ALLOW_PATHS_OUTSIDE_ROOT", "1")

    assert main(["data", "validate", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("5 valid (2 anomalous, pixel-level), 0 problems")
    argv = ["evaluate", "--model", str(model_dir), "--data", str(root), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    scored = (tmp_path / "out" / "predictions.csv").read_text()
    assert existing in scored


@pytest.mark.parametrize(
    ("category", "specie"), [("../../x", "good"), ("/abs/dir", "good"), ("..", "good"), ("bottle", "../../x")]
)
def test_names_that_would_escape_the_output_folder_are_refused(tmp_path, capsys, model_dir, category, specie):
    root = tmp_path / "deep" / "data"
    write_image(root / "a.png", size=(16, 16))
    record = make_record("a.png", cls_name=category, anomaly=0, specie_name=specie)
    (root / "meta.json").write_text(json.dumps({"test": {category: [record]}}))
    output = tmp_path / "deep" / "out"

    assert main(["evaluate", "--model", str(model_dir), "--data", str(root), "--output", str(output)]) == 2
    first = _first_error_line(capsys)
    if category != "bottle":
        assert first == (
            f"cops-hf evaluate: error: {root / 'meta.json'}: split 'test': category {category!r} is not a plain "
            "folder name (no '/', '\\', '.', '..' or empty names)"
        )
    else:
        assert first.startswith(f"cops-hf evaluate: error: {root / 'meta.json'} [test]: 1 invalid of 1 records")
        assert "field 'specie_name' '../../x' is not a plain folder name" in first
    assert main(["data", "validate", str(root)]) in (1, 2)
    assert sorted(path.name for path in (tmp_path / "deep").iterdir()) == ["data"]
    assert not (tmp_path / "x").exists() and not Path("/abs/dir").exists()


# ---------------------------------------------------------------- downloads: bounded, http(s) only, no symlinks


class _ScriptedServer(LoopbackServer):
    """A 127.0.0.1 server whose every GET is answered by `answer(handler)`; `requests` records the Range headers."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        super().__init__()
        self.answer, self.requests = answer, []

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the name BaseHTTPRequestHandler calls
                server.requests.append(self.headers.get("Range"))
                server.answer(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Quiet."""

        return Handler


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def _png_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 40, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_url_images_get_the_pixel_limit_of_files(tmp_path):
    bomb = write_png_header(tmp_path / "big.png", 10000, 10000).read_bytes()  # 10^8 pixels in 100 bytes
    with _ScriptedServer(lambda handler: _send(handler, 200, bomb)) as server:
        with pytest.raises(ImageLoadError, match=r"^Image URL 'http://.*/big.png' is 10000x10000 pixels, over"):
            load_image(f"{server.url}/big.png")


def test_url_images_have_a_byte_cap(tmp_path, monkeypatch):
    picture = _png_bytes((64, 64))
    assert len(picture) > 100
    with _ScriptedServer(lambda handler: _send(handler, 200, picture)) as server:
        assert load_image(f"{server.url}/a.png").size == (64, 64)
        monkeypatch.setenv(MAX_URL_BYTES_ENV, "100")
        with pytest.raises(ImageLoadError, match=f"sends more than 100 bytes, over the cap of {MAX_URL_BYTES_ENV}"):
            load_image(f"{server.url}/a.png")
    # Without a Content-Length (the body ends with the connection) the cap holds while reading.
    def unannounced(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(picture)
        handler.close_connection = True

    with _ScriptedServer(unannounced) as server:
        with pytest.raises(ImageLoadError, match="sends more than 100 bytes"):
            load_image(f"{server.url}/a.png")


def test_url_redirects_away_from_http_are_refused():
    def to_ftp(handler: BaseHTTPRequestHandler) -> None:
        _send(handler, 302, b"", {"Location": "ftp://127.0.0.1/etc/passwd"})

    with _ScriptedServer(to_ftp) as server:
        with pytest.raises(ImageLoadError, match="redirect to 'ftp://127.0.0.1/etc/passwd' refused: only http"):
            load_image(f"{server.url}/a.png")


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _checkpoint_folder(cache: Path, content: bytes) -> Path:
    return cache / "cops_hf" / "cqylunlun--CoPS" / git_blob_id(content)


def test_a_download_that_keeps_dropping_gives_up_and_leaves_nothing(tmp_path, online):
    content = bytes(range(256)) * 400

    def ignore_range_and_drop(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)  # the whole file, whatever Range asked for
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content[: len(content) // 3])
        handler.close_connection = True

    cache = tmp_path / "cache"
    with _ScriptedServer(ignore_range_and_drop) as server:
        with pytest.raises(OfficialReleaseError, match=f"dropped {MAX_DOWNLOAD_ATTEMPTS} times") as raised:
            download_official_checkpoint("visa", base_url=server.url, blob_sha1=git_blob_id(content), cache_dir=cache)
    assert "\n" not in str(raised.value) and "deleted the partial file" in str(raised.value)
    assert len(server.requests) == MAX_DOWNLOAD_ATTEMPTS
    assert server.requests[1] == f"bytes={len(content) // 3}-"  # it did try to resume
    assert not cache.exists()


def test_a_symlinked_partial_download_is_never_written_through(tmp_path, online):
    content = b"checkpoint bytes" * 100
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = _checkpoint_folder(tmp_path / "cache", content)
    folder.mkdir(parents=True)
    (folder / "epoch_10.pth.incomplete").symlink_to(victim)
    with StaticFileServer({"/results/models/visa/epoch_10.pth": content}) as files:
        with pytest.raises(OfficialReleaseError, match="epoch_10.pth.incomplete is a symbolic link"):
            download_official_checkpoint("visa", base_url=files.url, blob_sha1=git_blob_id(content),
                                         cache_dir=tmp_path / "cache")  # fmt: skip
    assert victim.read_bytes() == b"precious" and files.requests == []


@pytest.mark.parametrize("sha1", ["../../x", "abc", "0" * 39, "g" * 40, "0" * 41, "../" + "0" * 37])
def test_checkpoint_sha1_must_be_40_hex_digits(tmp_path, capsys, online, sha1):
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ValueError, match=f"must be 40 hex digits, got {re.escape(repr(sha1))}"):
        download_official_checkpoint("visa", base_url="http://127.0.0.1:9", blob_sha1=sha1, cache_dir=cache)
    with pytest.raises(SystemExit, match="2"):  # argparse refuses it
        main(["convert", "--official", "visa", "--checkpoint-sha1", sha1, "--output", str(tmp_path / "m")])
    assert _first_error_line(capsys) == (
        f"cops-hf convert: error: argument --checkpoint-sha1: must be a SHA-1 of 40 hex digits, got {sha1!r}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("partial", ["complete", "corrupt"])
def test_a_complete_partial_download_and_a_416_recover(tmp_path, online, partial):
    content = b"the published checkpoint " * 200
    folder = _checkpoint_folder(tmp_path / "cache", content)
    folder.mkdir(parents=True)
    kept = content if partial == "complete" else b"X" * len(content)  # all there; or as long, but wrong
    (folder / "epoch_10.pth.incomplete").write_bytes(kept)
    with StaticFileServer({"/results/models/visa/epoch_10.pth": content}) as files:
        for _ in range(2):  # and again, from the cache
            path = download_official_checkpoint(
                "visa", base_url=files.url, blob_sha1=git_blob_id(content), cache_dir=tmp_path / "cache"
            )
            assert path == folder / "epoch_10.pth" and path.read_bytes() == content
    # Verified as it was; or refused with 416 for the range past its end, then downloaded afresh, once.
    expected = [] if partial == "complete" else [("GET", f"bytes={len(content)}-"), ("GET", None)]
    assert [(method, ranges) for method, _, ranges in files.requests] == expected
    assert sorted(path.name for path in folder.iterdir() if path.suffix != ".lock") == ["epoch_10.pth"]


# ---------------------------------------------------------------- CSV cells that would start a formula


def test_formula_cells_are_neutralised():
    hostile = ["=HYPERLINK(\"x\")", "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    assert [formula_safe_cell(value) for value in hostile] == ["'" + value for value in hostile]
    harmless = ["bottle", "-0.5", "+1e-3", "-", "", 0.25, None, "a=b"]
    assert [formula_safe_cell(value) for value in harmless] == harmless


def test_every_csv_writer_goes_through_the_formula_guard():
    package = Path(__file__).resolve().parents[1] / "cops_hf"
    writers = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py")
        if path.name != "file_utils.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"csv\.(writer|DictWriter)\(", line)
    ]
    assert writers == []


def test_predict_and_evaluate_csvs_hold_no_formulas(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("=cmd.png", "@a.png", "+b.png", "-c.png"):
        write_image(tmp_path / name, size=(16, 16))
    assert main(["predict", "--model", str(model_dir), "--output", "out", "--no-overlays", "--",
                 "=cmd.png", "@a.png", "+b.png", "-c.png"]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert [row["image_path"] for row in rows] == ["'=cmd.png", "'@a.png", "'+b.png", "'-c.png"]
    assert all(0.0 <= float(row["pred_score"]) <= 1.0 for row in rows)

    data = _dataset(tmp_path / "data", category="=1+1")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--output", "evaluation",
                 "--num-visualizations", "0"]) == 0  # fmt: skip
    metrics = list(csv.reader(open(tmp_path / "evaluation" / "metrics.csv")))
    predictions = list(csv.DictReader(open(tmp_path / "evaluation" / "predictions.csv")))
    assert "'=1+1" in [row[0] for row in metrics] and "=1+1" not in sum(metrics, [])
    assert {row["category"] for row in predictions} == {"'=1+1"}
    assert all(not row["image_path"].startswith(FORMULA_TRIGGERS) for row in predictions)


def test_the_app_batch_csv_holds_no_formulas(model_dir, tmp_path):
    from transformers import pipeline

    from cops_hf.app import AnomalyApp, AppModel

    detector = pipeline("anomaly-detection", model=str(model_dir))
    upload = write_image(tmp_path / "uploads" / '=HYPERLINK("http:evil","x").png', size=(16, 16))
    logic = AnomalyApp([AppModel.from_detector("tiny", detector)])

    _, rows, csv_path = logic.score_batch([str(upload)], "tiny", 0.5, 0.5, tmp_path / "batch")

    (saved,) = list(csv.DictReader(open(csv_path)))
    assert saved["image_path"] == "'" + upload.name
    assert float(saved["pred_score"]) == pytest.approx(rows[0][1], abs=1e-6)
