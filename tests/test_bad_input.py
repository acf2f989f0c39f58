"""Bad input on every CLI command: exit status 2, one line ``bastion: error: ...`` on stderr, no
traceback, no run directory left behind, nothing already computed lost.

Most cases call `experiments.cli.main` in-process (fast); a few run ``bastion`` as a process to
check what a user sees."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a small trained digits model (``model.safetensors``) and helper files."""
    d = tmp_path_factory.mktemp("bad")
    assert main(["train", "--quiet", "--epochs", "1", "--max", "200", "--threads", "1",
                 "--out", str(d / "std")]) == 0
    (d / "a_file").write_text("not a directory\n")
    _rgb_imagefolder(d / "rgb")
    _bomb_imagefolder(d / "bomb")
    card = json.loads((d / "std" / "model.json").read_text())
    for name, change in {"short_names": {"class_names": ["0", "1"]}, "ten": {"num_classes": "ten"}}.items():
        (d / f"{name}.safetensors").write_bytes((d / "std" / "model.safetensors").read_bytes())
        (d / f"{name}.json").write_text(json.dumps(card | change))
    return d


def _rgb_imagefolder(root: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8), (40 * k, 200, 30)).save(root / c / f"{k}.png")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_imagefolder(root: Path) -> None:
    """A PNG whose header claims 30000 x 30000 pixels (PIL refuses it as a decompression bomb)."""
    (root / "a").mkdir(parents=True)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)) \
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")
    (root / "a" / "bomb.png").write_bytes(png)


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err}"
    assert err.startswith("bastion: error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w.lower() in err.lower(), err
    return err


def _fill(argv: list[str], work: Path, out: Path) -> list[str]:
    return [a.format(model=work / "std" / "model.safetensors", work=work, out=out) for a in argv]


TRAIN = ["train", "--quiet", "--epochs", "1", "--max", "64", "--out", "{out}"]
EVAL = ["evaluate", "--quiet", "--model", "{model}", "--max", "16", "--steps", "1", "--out", "{out}"]
CERT = ["certify", "--quiet", "--model", "{model}", "--sigma", "0.25", "--n", "20", "--max", "4", "--out", "{out}"]

# (id, argv, words the message must contain)
CASES = [
    ("train-batch-size-0", TRAIN + ["--batch-size", "0"], ["--batch-size", "positive"]),
    ("train-batch-size-neg", TRAIN + ["--batch-size", "-1"], ["--batch-size"]),
    ("train-max-0", TRAIN + ["--max", "0"], ["--max"]),
    ("train-max-neg", TRAIN + ["--max", "-1"], ["--max"]),
    ("train-max-word", TRAIN + ["--max", "ten"], ["--max", "integer"]),
    ("train-skip-0", TRAIN + ["--skip", "0"], ["--skip"]),
    ("train-epochs-0", TRAIN + ["--epochs", "0"], ["--epochs"]),
    ("train-lr-nan", TRAIN + ["--lr", "nan"], ["--lr", "finite"]),
    ("train-lr-inf", TRAIN + ["--lr", "inf"], ["--lr", "finite"]),
    ("train-wd-nan", TRAIN + ["--weight-decay", "nan"], ["--weight-decay"]),
    ("train-momentum-neg", TRAIN + ["--momentum", "-0.5"], ["--momentum"]),
    ("train-sigma-0", TRAIN + ["--objective", "gaussian", "--sigma", "0"], ["--sigma"]),
    ("train-eps-empty", TRAIN + ["--objective", "pgd", "--eps", ""], ["--eps", "empty"]),
    ("train-eps-two", TRAIN + ["--objective", "pgd", "--eps", "0.1,0.2"], ["--eps", "one radius"]),
    ("train-eps-neg", TRAIN + ["--objective", "pgd", "--eps", "-0.1"], ["--eps"]),
    ("train-image-size-0", TRAIN + ["--image-size", "0"], ["--image-size"]),
    ("train-device-bogus", TRAIN + ["--device", "bogus"], ["bogus"]),
    ("train-device-cuda9", TRAIN + ["--device", "cuda:x"], ["cuda:x"]),
    ("train-threads-0", TRAIN + ["--threads", "0"], ["--threads"]),
    ("train-unknown-objective", TRAIN + ["--objective", "nope"], ["nope"]),
    ("train-foreign-param", TRAIN + ["--param", "foo=bar"], ["foo"]),
    ("train-param-no-equals", TRAIN + ["--param", "foo"], ["KEY=VALUE"]),
    ("train-unknown-model", TRAIN + ["--model", "nope"], ["nope"]),
    ("train-unknown-dataset", TRAIN + ["--dataset", "nope"], ["nope"]),
    ("train-schedule-choice", TRAIN + ["--schedule", "linear"], ["--schedule"]),
    ("train-bomb-png", TRAIN + ["--dataset", "imagefolder", "--data-root", "{work}/bomb"], ["bomb"]),
    ("train-out-file", ["train", "--quiet", "--out", "{work}/a_file"], ["a_file"]),
    ("train-out-under-file", ["train", "--quiet", "--out", "{work}/a_file/run"], ["a_file"]),
    ("train-out-proc", ["train", "--quiet", "--epochs", "1", "--max", "64", "--out", "/proc/bastion-run"],
     ["/proc"]),
    ("eval-max-0", EVAL + ["--max", "0"], ["--max"]),
    ("eval-skip-0", EVAL + ["--skip", "0"], ["--skip"]),
    ("eval-device-bogus", EVAL + ["--device", "bogus"], ["bogus"]),
    ("eval-out-file", EVAL[:-1] + ["{work}/a_file"], ["a_file"]),
    ("eval-eps-empty", EVAL + ["--eps", ""], ["--eps"]),
    ("eval-eps-commas", EVAL + ["--eps", ",,"], ["--eps"]),
    ("eval-eps-div0", EVAL + ["--eps", "8/0"], ["zero"]),
    ("eval-batch-size-0", EVAL + ["--batch-size", "0"], ["batch-size"]),
    ("eval-batch-size-neg", EVAL + ["--batch-size", "-1"], ["batch-size"]),
    ("eval-attack-param-abc", EVAL + ["--attack-param", "pgd.steps=abc"], ["steps"]),
    ("eval-attack-param-unknown", EVAL + ["--attack-param", "pgd.foo=1"], ["foo"]),
    ("eval-unknown-attack", EVAL + ["--attacks", "nope"], ["nope"]),
    ("eval-image-size-16", EVAL + ["--image-size", "16"], ["shape"]),
    ("eval-rgb-for-gray", EVAL + ["--dataset", "imagefolder", "--data-root", "{work}/rgb"], ["shape"]),
    ("eval-short-class-names", ["evaluate", "--quiet", "--model", "{work}/short_names.safetensors", "--max", "16",
                                "--steps", "1", "--out", "{out}"], ["class"]),
    ("cert-sigma-nan", CERT + ["--sigma", "nan"], ["sigma"]),
    ("cert-sigma-inf", CERT + ["--sigma", "inf"], ["sigma"]),
    ("cert-sigma-0", CERT + ["--sigma", "0"], ["sigma"]),
    ("cert-max-radius-nan", CERT + ["--max-radius", "nan"], ["radius"]),
    ("cert-n-0", CERT + ["--n", "0"], ["n"]),
    ("cert-max-0", CERT + ["--max", "0"], ["--max"]),
    ("cert-num-classes-ten", ["certify", "--quiet", "--model", "{work}/ten.safetensors", "--sigma", "0.25",
                              "--n", "20", "--max", "4", "--out", "{out}"], ["num_classes"]),
    ("cert-image-size-16", CERT + ["--image-size", "16"], ["shape"]),
    ("cert-out-file", CERT[:-1] + ["{work}/a_file"], ["a_file"]),
    ("report-no-dir", ["report", "{out}"], ["run directory"]),
    ("quickstart-only-nope", ["quickstart", "--quiet", "--only", "nope", "--out", "{out}"],
     ["robustness", "aaer", "certification"]),
    ("quickstart-out-file", ["quickstart", "--quiet", "--out", "{work}/a_file"], ["a_file"]),
    ("no-such-option", ["train", "--epochz", "3"], ["--epochz"]),
]
# the commands added with the methods and the three jobs
CASES += [
    ("eval-unknown-attack", ["evaluate", "--quiet", "--model", "{model}", "--attacks", "pgd,nosuch", "--max", "4",
                             "--out", "{out}"], ["unknown attack", "nosuch"]),
    ("cert-n0-0", ["certify", "--quiet", "--model", "{model}", "--sigma", "0.25", "--n0", "0", "--out", "{out}"],
     ["n0"]),
    ("conformal-sigma-neg", ["conformal", "--quiet", "--model", "{model}", "--sigma", "-1", "--out", "{out}"],
     ["--sigma"]),
    ("leaderboard-not-toml", ["leaderboard", "{work}/a_file", "--out", "{out}"], ["not valid TOML"]),
    ("sweep-missing-config", ["sweep", "{work}/no-such.toml", "--out", "{out}"], ["not found"]),
    ("detect-unknown-adaptive-mode", ["detect", "--quiet", "--adaptive-modes", "bogus", "--out", "{out}"],
     ["--adaptive-modes", "bogus"]),
    ("cert-anytime-randomized-bound", ["certify", "--quiet", "--model", "{model}", "--sigma", "0.25", "--anytime",
                                       "--bound", "randomized", "--out", "{out}"], ["randomized", "exact mode"]),
    ("eval-fab-t-bad-eps", ["evaluate", "--quiet", "--model", "{model}", "--attacks", "fab-t", "--eps", "l1:1",
                            "--out", "{out}"], ["--eps", "l1:1"]),
]


def _params():
    for cid, argv, words in CASES:
        yield pytest.param(cid, argv, words, id=cid)


@pytest.mark.parametrize("cid,argv,words", list(_params()))
def test_bad_input_is_one_line_and_leaves_nothing(cid, argv, words, work, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, _fill(argv, work, out), *words)
    assert not out.exists(), f"{cid} left a run directory behind"


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_bad_rerun_keeps_what_was_computed(work, capsys):
    before = _digest(work / "std")
    for argv in (["train", "--quiet", "--epochs", "1", "--max", "200", "--batch-size", "0"],
                 ["train", "--quiet", "--epochs", "1", "--max", "200", "--param", "foo=bar"],
                 ["train", "--quiet", "--epochs", "1", "--max", "200", "--device", "bogus"]):
        one_line_error(capsys, argv + ["--out", str(work / "std")])
    assert _digest(work / "std") == before
    ev = ["evaluate", "--quiet", "--model", str(work / "std" / "model.safetensors"), "--max", "16", "--steps", "1",
          "--out", str(work / "eval")]
    assert main(ev) == 0
    before = _digest(work / "eval")
    for extra in (["--eps", ""], ["--batch-size", "0"], ["--device", "bogus"], ["--max", "-1"]):
        one_line_error(capsys, ev + extra)
    assert _digest(work / "eval") == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_out_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(capsys, ["train", "--quiet", "--epochs", "1", "--max", "64", "--out", str(ro / "run")],
                       "not writable")
    finally:
        ro.chmod(0o755)


# --- TOML configs -------------------------------------------------------------------------------

TOML_CASES = [
    ("max-true", 'command = "train"\nmax = true\n', ["max"]),
    ("quiet-no", 'command = "train"\nquiet = "no"\n', ["quiet", "true or false"]),
    ("max-0", 'command = "train"\nmax = 0\n', ["max"]),
    ("epochs-float", 'command = "train"\nepochs = 1.5\n', ["epochs", "integer"]),
    ("lr-string", 'command = "train"\nlr = "fast"\n', ["lr", "fast"]),
    ("lr-list", 'command = "train"\nlr = [0.1, 0.2]\n', ["lr", "single"]),
    ("device-bogus", 'command = "train"\ndevice = "bogus"\n', ["bogus"]),
    ("schedule-choice", 'command = "train"\nschedule = "linear"\n', ["schedule"]),
    ("unknown-key", 'command = "train"\nepochz = 3\n', ["epochz"]),
    ("unknown-command", 'command = "nope"\n', ["nope"]),
    ("command-number", 'command = 3\n', ["3"]),
    ("no-command", 'epochs = 3\n', ["command"]),
    ("quickstart-command", 'command = "quickstart"\n', ["quickstart"]),
    ("syntax", 'command = "train"\nepochs = \n', ["TOML"]),
    ("param-nested", 'command = "train"\nparam = {a = {b = 1}}\n', ["param"]),
    ("certify-sigma-word", 'command = "certify"\nmodel = "m.safetensors"\nsigma = "abc"\n', ["sigma"]),
    ("certify-no-model", 'command = "certify"\nsigma = 0.25\n', ["model"]),
    ("certify-model-table", 'command = "certify"\nmodel = {a = 1}\nsigma = 0.25\n', ["model"]),
]


@pytest.mark.parametrize("cid,text,words", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_toml_is_one_line(cid, text, words, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + f'out = "{tmp_path / "run"}"\n' if "out =" not in text else text)
    one_line_error(capsys, ["run", str(cfg)], *words)
    assert not (tmp_path / "run").exists()


def test_non_utf8_and_missing_toml(tmp_path, capsys):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes('command = "train"\n# caf\u00e9\n'.encode("latin-1"))
    one_line_error(capsys, ["run", str(cfg)], "UTF-8")
    one_line_error(capsys, ["run", str(tmp_path / "missing.toml")], "not found")
    one_line_error(capsys, ["run", str(tmp_path)], "not found")


# --- report -------------------------------------------------------------------------------------

REPORT_CASES = [
    ("truncated", b'{"schema_version": 1, "sections": [{"type": "rob'),
    ("binary", bytes(range(256)) * 4),
    ("empty", b""),
    ("list", b"[]"),
    ("sections-not-list", b'{"schema_version": 1, "sections": 3}'),
    ("section-not-object", b'{"schema_version": 1, "sections": [1, 2]}'),
    ("wrong-schema", b'{"schema_version": 99, "sections": []}'),
    ("robustness-without-data", b'{"schema_version": 1, "sections": [{"type": "robustness", "title": "x", '
                                b'"data": {}}]}'),
    ("certification-wrong-shape", b'{"schema_version": 1, "sections": [{"type": "certification", "title": "x", '
                                  b'"data": {"settings": [{"name": 3}]}}]}'),
]


@pytest.mark.parametrize("cid,content", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_on_damaged_metrics_is_one_line(cid, content, tmp_path, capsys):
    (tmp_path / "metrics.json").write_bytes(content)
    one_line_error(capsys, ["report", "--quiet", str(tmp_path)], "metrics.json")
    assert (tmp_path / "metrics.json").read_bytes() == content


# --- what a user sees: real processes -----------------------------------------------------------

@pytest.mark.parametrize("argv", [["train", "--batch-size", "0"], ["train", "--device", "bogus"],
                                  ["report", "no-such-dir"], ["quickstart", "--only", "x"]],
                         ids=["batch-size", "device", "report", "quickstart"])
def test_process_prints_one_line_and_exits_2(argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "experiments", *argv], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("bastion: error:") and r.stderr.count("\n") == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_record_line_without_index_is_one_line(work, capsys):
    ev = ["evaluate", "--quiet", "--model", str(work / "std" / "model.safetensors"), "--max", "8", "--steps", "1",
          "--out", str(work / "eval-noindex")]
    assert main(ev) == 0
    log = work / "eval-noindex" / "records.jsonl"
    log.write_text(log.read_text() + '{"probe": "clean", "kind": "robust"}\n')
    (work / "eval-noindex" / "metrics.json").unlink()
    one_line_error(capsys, ev, "index")
