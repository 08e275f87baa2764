"""The README's file table: every file it lists exists with the line count it states, and every source file of
the project is listed (counts that go stale mislead the learners the table is for)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table():
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert rows, "README.md has no file table"
    return {path: int(n) for path, n in rows}


def test_line_counts_are_true():
    for path, n in _table().items():
        f = ROOT / path
        assert f.is_file(), f"README lists {path}, which does not exist"
        assert len(f.read_text().splitlines()) == n, f"README says {path} has {n} lines"


def test_every_source_file_is_listed():
    sources = {str(p.relative_to(ROOT)) for d in ("minillava", "kernels", "weights") for p in (ROOT / d).glob("*.py")}
    sources |= {p.name for p in ROOT.glob("*.py")}
    missing = sources - set(_table())
    assert not missing, f"README's file table lacks {sorted(missing)}"
