"""The README and docs/ cannot drift from the code or from what the commands printed.

- A code link names what it points at, [`LedgerResidual.forward`](ledger.py#L410-L418), and its line
  range must be exactly that function's or class's lines. Moving the code fails this test until
  `make docs` (tools/docs_anchors.py) rewrites the ranges; a renamed function needs its link renamed.
- Every relative link resolves: the file exists, and a #heading anchor names a heading of it.
- Every file in docs/results/ is a file a command wrote, and starts with its provenance header
  (cli.results_header: the command, the date, the commit, the machine, torch).
- A results table copied into a doc sits between `<!-- results: docs/results/FILE.md -->` and
  `<!-- end results -->`, and every cell of it is the cell of a table of that file in the same row
  (named by its first cell) and column (named by its header): columns may be left out, never retyped.
"""
import glob
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from docs_anchors import DOCS, FENCED, definitions, fix_anchors  # noqa: E402

LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
CODE_LINK = re.compile(r"^`([\w.]+)`$")


def links(doc):
    with open(os.path.join(REPO, doc)) as f:
        text = FENCED.sub("", f.read())
    return [(m.group(1), m.group(2)) for m in LINK.finditer(text)]


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md_path):
    with open(md_path) as f:
        text = FENCED.sub("", f.read())
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def code_links():
    for doc in DOCS:
        for text, target in links(doc):
            path, _, anchor = target.partition("#")
            if path.endswith(".py") and anchor.startswith("L"):
                yield doc, text, path, anchor


def code_link_error(doc_dir, text, path, anchor):
    """Why the link [text](path#anchor) of a doc in doc_dir is wrong, or None when it is right."""
    name = CODE_LINK.match(text)
    if not name:
        return f"the link [{text}]({path}#{anchor}) must name its target as [`Class.method`]"
    lines = re.fullmatch(r"L(\d+)(?:-L(\d+))?", anchor)
    if not lines:
        return f"{path}#{anchor} is not a line anchor (#L12 or #L12-L30)"
    first, last = int(lines.group(1)), int(lines.group(2) or lines.group(1))
    spans, qualified = definitions(os.path.normpath(os.path.join(doc_dir, path))), name.group(1)
    if qualified not in spans:
        return f"{path} defines no {qualified}"
    if (first, last) != spans[qualified]:
        want = spans[qualified]
        return (f"[`{qualified}`]({path}#{anchor}) points at lines {first}-{last}, but {qualified} is at lines "
                f"{want[0]}-{want[1]}: use #L{want[0]}-L{want[1]} (run `make docs`)")
    return None


@pytest.mark.parametrize("doc", DOCS)
def test_every_code_link_holds_exactly_the_function_it_names(doc):
    found = [link for link in code_links() if link[0] == doc]
    errors = [code_link_error(os.path.join(REPO, os.path.dirname(doc)), *link[1:]) for link in found]
    assert not any(errors), f"{doc}: " + "; ".join(e for e in errors if e)
    if doc == "README.md":
        assert len(found) >= 6, "the README's Ledger equations link to their code"


def test_a_moved_function_fails_the_link_check(tmp_path):
    (tmp_path / "code.py").write_text("def first():\n    return 1\n\n\ndef second():\n    return 2\n")
    assert code_link_error(tmp_path, "`second`", "code.py", "L5-L6") is None
    (tmp_path / "code.py").write_text("\n\ndef first():\n    return 1\n\n\ndef second():\n    return 2\n")
    assert "use #L7-L8" in code_link_error(tmp_path, "`second`", "code.py", "L5-L6")
    assert "defines no third" in code_link_error(tmp_path, "`third`", "code.py", "L5-L6")
    assert "must name its target" in code_link_error(tmp_path, "the second function", "code.py", "L5-L6")
    assert "run `make docs`" in code_link_error(tmp_path, "`second`", "code.py", "L5-L6")


def test_make_docs_moves_each_stale_link_to_its_function_and_changes_nothing_else(tmp_path):
    (tmp_path / "code.py").write_text("\n\nclass A:\n    def f(self):\n        return 1\n\n\ndef g():\n    return 2\n")
    doc = ("[`A.f`](code.py#L1-L2) and [`g`](code.py#L8-L9), [text](code.py#L1) and [`h`](code.py#L1-L2)\n"
           "```\n[`g`](code.py#L1-L2) in a code block is an example\n```\n")
    fixed, moved, unknown = fix_anchors(doc, tmp_path)
    assert fixed == doc.replace("code.py#L1-L2) and [`g`]", "code.py#L4-L5) and [`g`]")
    assert moved == 1 and unknown == ["code.py defines no h"]
    assert code_link_error(tmp_path, "`A.f`", "code.py", "L4-L5") is None


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    for text, target in links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else \
            os.path.join(REPO, doc)
        assert os.path.exists(resolved), f"{doc}: [{text}]({target}) points at a missing file"
        if anchor and resolved.endswith(".md"):
            assert anchor in anchors(resolved), f"{doc}: [{text}]({target}): no heading #{anchor} in {path or doc}"


RESULTS = sorted(glob.glob(os.path.join(REPO, "docs", "results", "*.md")))


@pytest.mark.parametrize("path", RESULTS, ids=os.path.basename)
def test_every_results_file_starts_with_its_provenance_header(path):
    with open(path) as f:
        head = f.read(2000)
    assert head.startswith("> Written by `python "), f"{path} was not written by a command (no provenance header)"
    assert re.search(r"at commit \w+", head) and " torch " in head and re.search(r"\d{4}-\d\d-\d\d", head), head


def copied_blocks(doc):
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    return re.findall(r"<!-- results: (\S+) -->\n(.*?)<!-- end results -->", text, flags=re.S)


def tables(text):
    """Every markdown table in text, as its rows of cells, the header first and the |---| row left out."""
    found, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"[|:\- ]+", line):
                rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif rows:
            found.append(rows)
            rows = []
    return found


def copy_error(block, source_text):
    """Why a table copied from a results file is not made of that file's cells, or None when it is:
    each cell must be the cell of one table of the file in the same row (named by its first cell) and
    the same column (named by its header)."""
    if not all(line.startswith("|") for line in block.strip().splitlines()):
        return "a copied block holds one table and nothing else"
    [(header, *rows)] = tables(block)
    wrong = [f"no table of it has the columns {header}"]
    for table in (t for t in tables(source_text) if set(header) <= set(t[0])):
        at = [table[0].index(column) for column in header]
        source_rows = {row[0]: [row[i] for i in at] for row in table[1:]}
        wrong = [" | ".join(row) for row in rows if source_rows.get(row[0]) != row]
        if not wrong:
            return None
    return f"a row is not in it (re-copy its cells, never retype them): {wrong[0][:120]}"


@pytest.mark.parametrize("doc", DOCS)
def test_results_copied_into_a_doc_are_cells_of_their_results_file(doc):
    for source, block in copied_blocks(doc):
        with open(os.path.join(REPO, source)) as f:
            error = copy_error(block, f.read())
        assert error is None, f"{doc}: a table copied from {source}: {error}"


def test_a_copied_table_may_leave_columns_out_but_never_retype_a_cell():
    source = "| arm | loss | verdict |\n|---|---|---|\n| a | 3.19 | 5 of 5 |\n| b | 3.20 | 1 of 5 |\n\nprose\n"
    assert copy_error(source.split("\n\n")[0], source) is None                       # the whole table
    assert copy_error("| arm | verdict |\n|---|---|\n| b | 1 of 5 |\n", source) is None  # a column and a row left out
    assert "re-copy" in copy_error("| arm | verdict |\n|---|---|\n| b | 2 of 5 |\n", source)
    assert "re-copy" in copy_error("| arm | verdict |\n|---|---|\n| c | 1 of 5 |\n", source)
    assert "no table of it has the columns" in copy_error("| arm | seeds |\n|---|---|\n| b | 5 |\n", source)
    assert "one table" in copy_error("prose\n| arm |\n|---|\n| a |\n", source)


def test_the_readme_has_a_copied_headline_table_and_stays_short():
    assert copied_blocks("README.md"), "the README's headline table is copied from a docs/results file"
    _, headline = copied_blocks("README.md")[0]
    assert len(tables(headline)[0][0]) <= 6, "the README's headline table has at most 6 columns"
    with open(os.path.join(REPO, "README.md")) as f:
        assert len(f.read().splitlines()) <= 160, "the README is read in five minutes: move detail to docs/"
