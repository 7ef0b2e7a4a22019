"""
Point every code link of the README and docs/ at the current lines of what it names (`make docs`).

A code link names a function, method or class and the lines it spans:

    [`LedgerResidual.forward`](ledger.py#L410-L417)

Code moves, and the line numbers go stale; tests/test_docs.py fails on a stale one. This rewrites
each such anchor to the lines that ast finds for the name today, and changes nothing else. A link
whose name the file no longer defines cannot be fixed by line numbers: it is reported, and left.

    python tools/docs_anchors.py
"""
import ast
import glob
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
# [`name`](path.py#L12-L30); the name is what the link promises, the anchor only where it is today
CODE_LINK = re.compile(r"\[`([\w.]+)`\]\(([^)\s#]+\.py)#(L\d+(?:-L\d+)?)\)")
FENCED = re.compile(r"(```.*?```)", flags=re.S)  # code blocks hold examples, not links


def definitions(path):
    """{'Class.method': (first line, last line)} for every def and class in a Python file."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    spans = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                spans[name] = (child.lineno, child.end_lineno)
                visit(child, name + ".")
    visit(tree, "")
    return spans


def fix_anchors(text, doc_dir):
    """The text with every code link's anchor set to its name's current lines, how many links that
    moved, and the links that name nothing the file defines."""
    moved, unknown = [], []

    def fix(link):
        name, path, anchor = link.groups()
        code = os.path.normpath(os.path.join(doc_dir, path))
        spans = definitions(code) if os.path.isfile(code) else {}
        if name not in spans:
            unknown.append(f"{path} defines no {name}")
            return link.group(0)
        first, last = spans[name]
        if anchor != f"L{first}-L{last}":
            moved.append(name)
        return f"[`{name}`]({path}#L{first}-L{last})"

    parts = FENCED.split(text)  # odd parts are code blocks
    fixed = "".join(part if i % 2 else CODE_LINK.sub(fix, part) for i, part in enumerate(parts))
    return fixed, len(moved), unknown


def main(argv):
    if argv:
        print("error: docs_anchors.py takes no arguments: it rewrites the code links of README.md and "
              "docs/*.md in place", file=sys.stderr)
        return 2
    broken = []
    for doc in DOCS:
        path = os.path.join(REPO, doc)
        with open(path) as f:
            text = f.read()
        try:
            fixed, moved, unknown = fix_anchors(text, os.path.dirname(path))
        except SyntaxError as e:  # a file mid-edit: its lines are not known yet
            print(f"error: {os.path.relpath(e.filename, REPO)} line {e.lineno}: {e.msg}", file=sys.stderr)
            return 2
        broken += [f"{doc}: {problem}" for problem in unknown]
        if moved:
            with open(path, "w") as f:
                f.write(fixed)
            print(f"{doc}: {moved} code link(s) moved to the current lines")
    for problem in broken:
        print(f"error: {problem}: link the name it has now", file=sys.stderr)
    return 2 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
