"""Data stage: every input format, k-core, the split, bad input, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recdistill.trainer.data.pipeline import load_sequences
from recdistill.trainer.data.synthetic import SyntheticConfig, generate_synthetic
from recdistill.trainer.prepare_data import main as prepare_main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# Three users; times are deliberately out of file order for the formats that carry a time.
# Chronological sequences: u1 = a b c, u2 = b c a, u3 = c a b.
EXPECTED = {"u1": ["a", "b", "c"], "u2": ["b", "c", "a"], "u3": ["c", "a", "b"]}
TIMED_EVENTS = [  # (user, item, time) in file order
    ("u1", "b", 20),
    ("u2", "b", 5),
    ("u1", "a", 10),
    ("u3", "c", 1),
    ("u2", "c", 6),
    ("u1", "c", 30),
    ("u3", "a", 2),
    ("u2", "a", 7),
    ("u3", "b", 3),
]


def run_prepare(
    tmp_path: Path, fmt: str, text: str | None, *extra: str, name: str = "log", output=None
):
    args = [
        "--format",
        fmt,
        "--output",
        str(output or tmp_path / "out"),
        "--min-user-interactions",
        "1",
        "--min-item-interactions",
        "1",
        *extra,
    ]
    if text is not None:
        path = tmp_path / name
        path.write_text(text)
        args += ["--input", str(path)]
    return prepare_main(args)


def sequences(out: Path) -> dict[str, list[str]]:
    """Full chronological sequences (train + valid + test targets) in raw ids."""
    splits, _ = load_sequences(out)
    raw = pq.read_table(out / "item_map.parquet").column("raw_item").to_pylist()
    result = {}
    tests = {row["user"]: row for row in splits["test"]}
    for row in splits["train"]:
        items = list(row["items"])
        if row["user"] in tests:
            items = list(tests[row["user"]]["history"]) + [tests[row["user"]]["target"]]
        result[row["user"]] = [raw[i - 1] for i in items]
    return result


def test_sasrec_format(tmp_path):
    text = "".join(f"{u} {i}\n" for u, seq in EXPECTED.items() for i in seq)
    assert run_prepare(tmp_path, "sasrec", text) == 0
    assert sequences(tmp_path / "out") == EXPECTED


def test_lines_format(tmp_path):
    text = "".join(f"{u} {' '.join(seq)}\n" for u, seq in EXPECTED.items())
    assert run_prepare(tmp_path, "lines", text) == 0
    assert sequences(tmp_path / "out") == EXPECTED


def test_recbole_format(tmp_path):
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    text = header + "".join(f"{u}\t{i}\t4.0\t{t}\n" for u, i, t in TIMED_EVENTS)
    assert run_prepare(tmp_path, "recbole", text, name="x.inter") == 0
    assert sequences(tmp_path / "out") == EXPECTED


def test_movielens_format(tmp_path):
    text = "".join(f"{u}::{i}::5::{t}\n" for u, i, t in TIMED_EVENTS)
    assert run_prepare(tmp_path, "movielens", text, name="ratings.dat") == 0
    assert sequences(tmp_path / "out") == EXPECTED


@pytest.mark.parametrize("fmt,sep", [("csv", ","), ("tsv", "\t")])
def test_delimited_formats(tmp_path, fmt, sep):
    text = f"uid{sep}iid{sep}ts\n" + "".join(f"{u}{sep}{i}{sep}{t}\n" for u, i, t in TIMED_EVENTS)
    cols = ["--user-col", "uid", "--item-col", "iid", "--time-col", "ts"]
    assert run_prepare(tmp_path, fmt, text, *cols) == 0
    assert sequences(tmp_path / "out") == EXPECTED


def test_csv_iso_timestamps(tmp_path):
    text = "uid,iid,ts\n" + "".join(
        f"{u},{i},2024-01-01T00:00:{t:02d}\n" for u, i, t in TIMED_EVENTS
    )
    assert (
        run_prepare(
            tmp_path, "csv", text, "--user-col", "uid", "--item-col", "iid", "--time-col", "ts"
        )
        == 0
    )
    assert sequences(tmp_path / "out") == EXPECTED


def test_parquet_format(tmp_path):
    users, items, times = zip(*TIMED_EVENTS)
    pq.write_table(
        pa.table({"uid": list(users), "iid": list(items), "ts": list(times)}),
        tmp_path / "log.parquet",
    )
    args = [
        "--format",
        "parquet",
        "--input",
        str(tmp_path / "log.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--min-user-interactions",
        "1",
        "--min-item-interactions",
        "1",
        "--user-col",
        "uid",
        "--item-col",
        "iid",
        "--time-col",
        "ts",
    ]
    assert prepare_main(args) == 0
    assert sequences(tmp_path / "out") == EXPECTED


def test_jsonl_format(tmp_path):
    text = "".join(json.dumps({"uid": u, "iid": i, "ts": t}) + "\n" for u, i, t in TIMED_EVENTS)
    cols = ["--user-col", "uid", "--item-col", "iid", "--time-col", "ts"]
    assert run_prepare(tmp_path, "jsonl", text, *cols) == 0
    assert sequences(tmp_path / "out") == EXPECTED


def test_equal_times_keep_file_order(tmp_path):
    text = "uid,iid,ts\nu,x,5\nu,y,5\nu,z,1\n"
    assert (
        run_prepare(
            tmp_path, "csv", text, "--user-col", "uid", "--item-col", "iid", "--time-col", "ts"
        )
        == 0
    )
    assert sequences(tmp_path / "out") == {"u": ["z", "x", "y"]}


def test_kcore_hand_worked(tmp_path):
    # Round 1 counts only: drops u4 (1 event) and finds a3 b2 c1 d1. Round 2 drops c and d,
    # then u3 (only `a` left). Round 3 finds a2 b2 and u1, u2 with 2 each: stable.
    text = "u1 a b c\nu2 a b\nu3 a d\nu4 e\n"
    out = tmp_path / "out"
    assert (
        prepare_main(
            [
                "--format",
                "lines",
                "--input",
                _write(tmp_path, text),
                "--output",
                str(out),
                "--min-user-interactions",
                "2",
                "--min-item-interactions",
                "2",
            ]
        )
        == 0
    )
    assert sequences(out) == {"u1": ["a", "b"], "u2": ["a", "b"]}
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"], stats["kcore_rounds"]) == (
        2,
        2,
        4,
        3,
    )


def test_kcore_that_empties_everything(tmp_path, capsys):
    # With items needing 3: `a` falls to 2 once u4's and u3's events go, then b, then every user.
    path = _write(tmp_path, "u1 a b c\nu2 a b\nu3 a d\nu4 e\n")
    code = prepare_main(
        [
            "--format",
            "lines",
            "--input",
            path,
            "--output",
            str(tmp_path / "out"),
            "--min-user-interactions",
            "2",
            "--min-item-interactions",
            "3",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "k-core filtering" in err and path in err and "removed every interaction" in err
    assert not (tmp_path / "out").exists()


def test_leave_one_out_split_and_truncation(tmp_path):
    out = tmp_path / "out"
    text = "u 10 20 30 40 50 60 70\nshort 10 20\n"
    assert run_prepare(tmp_path, "lines", text, "--max-seq-len", "3", output=out) == 0
    splits, stats = load_sequences(out)
    train = {r["user"]: r["items"] for r in splits["train"]}
    # raw 10..70 -> ids 1..7 (numeric order); train keeps max_seq_len + 1 of seq[:-2]
    assert train == {"u": [2, 3, 4, 5], "short": [1, 2]}
    assert list(splits["valid"]) == [{"user": "u", "history": [3, 4, 5], "target": 6}]
    assert list(splits["test"]) == [{"user": "u", "history": [4, 5, 6], "target": 7}]
    assert stats["interactions"] == 9 and stats["sequence_length"]["max"] == 7

    whole = tmp_path / "whole"
    assert run_prepare(tmp_path, "lines", text, "--max-seq-len", "0", output=whole) == 0
    splits, _ = load_sequences(whole)
    assert {r["user"]: r["items"] for r in splits["train"]} == {
        "u": [1, 2, 3, 4, 5],
        "short": [1, 2],
    }
    assert list(splits["test"]) == [{"user": "u", "history": [1, 2, 3, 4, 5, 6], "target": 7}]
    assert run_prepare(tmp_path, "lines", text, "--max-seq-len", "-1", output=tmp_path / "n") == 2


def test_num_proc_does_not_change_output(tmp_path):
    outputs = []
    for num_proc in (1, 2):
        out = tmp_path / f"out{num_proc}"
        assert (
            prepare_main(
                [
                    "--format",
                    "synthetic",
                    "--users",
                    "300",
                    "--items",
                    "80",
                    "--events",
                    "6000",
                    "--output",
                    str(out),
                    "--num-proc",
                    str(num_proc),
                    "--num-parts",
                    "3",
                ]
            )
            == 0
        )
        splits, stats = load_sequences(out)
        outputs.append(({k: list(v) for k, v in splits.items()}, stats["interactions"]))
    assert outputs[0] == outputs[1]


def test_synthetic_is_deterministic_and_skewed():
    config = SyntheticConfig(users=500, items=300, events=20_000, seed=3)
    first = pa.concat_tables(generate_synthetic(config))
    second = pa.concat_tables(generate_synthetic(config))
    assert first.equals(second) and first.num_rows == 20_000
    counts = np.sort(np.bincount(np.asarray(first.column("item").to_pylist(), dtype=int)))[::-1]
    # power law: the top 10% of items take far more than 10% of the events
    assert counts[:30].sum() > 0.35 * counts.sum()


def test_synthetic_has_sequential_structure():
    """The most frequent successor of an item predicts the next event far better than popularity."""
    table = pa.concat_tables(
        generate_synthetic(SyntheticConfig(users=500, items=200, events=20_000, seed=1))
    )
    users = np.asarray(table.column("user").to_pylist(), dtype=int)
    items = np.asarray(table.column("item").to_pylist(), dtype=int)
    same_user = users[1:] == users[:-1]
    prev, nxt = items[:-1][same_user], items[1:][same_user]
    pairs = np.zeros((201, 201), dtype=int)
    np.add.at(pairs, (prev, nxt), 1)
    transition_hit = (pairs.argmax(axis=1)[prev] == nxt).mean()
    popularity_hit = (nxt == np.bincount(items).argmax()).mean()
    assert transition_hit > 3 * popularity_hit


# ---- bad input -------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "log") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "fmt,text,line,extra",
    [
        ("sasrec", "1 2\n1 3\n1 2 3\n", 3, []),
        ("lines", "1 2 3\n7\n", 2, []),
        ("movielens", "1::2::5::100\n1::3::5\n", 2, []),
        ("recbole", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t10\n1\t3\tnoon\n", 3, []),
        ("jsonl", '{"u": 1, "i": 2}\n{"u": 1, "i": \n', 2, ["--user-col", "u", "--item-col", "i"]),
        (
            "csv",
            "u,i,t\n1,2,5\n1,3,5,9\n",
            3,
            ["--user-col", "u", "--item-col", "i", "--time-col", "t"],
        ),
        (
            "csv",
            "u,i,t\n1,2,5\n1,3,late\n",
            3,
            ["--user-col", "u", "--item-col", "i", "--time-col", "t"],
        ),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, capsys, fmt, text, line, extra):
    path = _write(tmp_path, text)
    assert (
        prepare_main(["--format", fmt, "--input", path, "--output", str(tmp_path / "out"), *extra])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"{path}:{line}:" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["log"]  # no temp folder left behind


def test_unknown_format(tmp_path, capsys):
    assert (
        prepare_main(
            ["--format", "xml", "--input", _write(tmp_path, "x"), "--output", str(tmp_path / "o")]
        )
        == 2
    )
    assert "unknown format 'xml'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fmt,text", [("csv", "user,item\n1,2\n"), ("recbole", "user_id:token\tts:float\n1\t2\n")]
)
def test_missing_column(tmp_path, capsys, fmt, text):
    path = _write(tmp_path, text)
    extra = ["--user-col", "user", "--item-col", "product"] if fmt == "csv" else []
    assert (
        prepare_main(["--format", fmt, "--input", path, "--output", str(tmp_path / "o"), *extra])
        == 2
    )
    err = capsys.readouterr().err
    assert path in err and ("'product'" in err or "'item_id'" in err)


def test_existing_output_needs_overwrite_and_survives_failure(tmp_path, capsys):
    out = tmp_path / "out"
    good = _write(tmp_path, "u 1 2 3\n", "good")
    assert run_prepare(tmp_path, "lines", "u 1 2 3\n", output=out) == 0
    before = (out / "stats.json").read_text()
    # refused without --overwrite
    assert run_prepare(tmp_path, "lines", "v 1 2\n", output=out) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a failing run with --overwrite leaves the old output untouched
    bad = _write(tmp_path, "u 1 2 3\nv\n", "bad")
    assert (
        prepare_main(["--format", "lines", "--input", bad, "--output", str(out), "--overwrite"])
        == 2
    )
    assert (out / "stats.json").read_text() == before
    # a good run with --overwrite replaces it
    assert (
        prepare_main(
            [
                "--format",
                "lines",
                "--input",
                good,
                "--output",
                str(out),
                "--overwrite",
                "--min-user-interactions",
                "1",
                "--min-item-interactions",
                "1",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "log", "out"]


def test_cli_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainer/prepare_data.py"),
            "--format",
            "sasrec",
            "--input",
            str(tmp_path / "missing.txt"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "missing.txt: no such file" in result.stderr


# ---- real data (skips when ../shared/data is absent) ----------------------------------------


def _real(path: str) -> Path:
    full = SHARED / path
    if not full.is_file():
        pytest.skip(f"{full} not present")
    return full


@pytest.mark.realdata
def test_ml1m_counts(tmp_path):
    path = _real("ml-1m/ml-1m.txt")
    assert (
        prepare_main(["--format", "sasrec", "--input", str(path), "--output", str(tmp_path / "o")])
        == 0
    )
    stats = json.loads((tmp_path / "o/stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (6040, 3416, 999_611)


@pytest.mark.realdata
def test_beauty_lines(tmp_path):
    path = _real("beauty/Beauty.txt")
    assert (
        prepare_main(["--format", "lines", "--input", str(path), "--output", str(tmp_path / "o")])
        == 0
    )
    stats = json.loads((tmp_path / "o/stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (22_363, 12_101, 198_502)


@pytest.mark.realdata
def test_ml100k_recbole(tmp_path):
    path = _real("ml-100k/ml-100k.inter")
    assert (
        prepare_main(
            [
                "--format",
                "recbole",
                "--input",
                str(path),
                "--output",
                str(tmp_path / "o"),
                "--min-user-interactions",
                "1",
                "--min-item-interactions",
                "1",
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "o/stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100_000)
