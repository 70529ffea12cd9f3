"""The README's paper-to-code table links each formula to `file#Lnnn`: that line must be where the
first name of the link is defined, so a reader lands on it in one click (code moves; links rot)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# [`file.py: name, other`](file.py#L123)   or   [`run_all.sh`, section 4](run_all.sh#L274)
LINK = re.compile(r"\[`([\w.]+)(?:: ([\w.]+))?[^\]]*\]\(([\w./]+)#L(\d+)\)")


def links():
    return LINK.findall((REPO / "README.md").read_text())


def test_the_table_has_its_links():
    assert len(links()) >= 15


def test_every_code_link_lands_on_its_definition():
    wrong = []
    for shown, name, target, line in links():
        lines = (REPO / target).read_text().splitlines()
        text = lines[int(line) - 1].strip() if int(line) <= len(lines) else ""
        if name:                        # a function or class, maybe Class.method: its def line
            ok = re.match(rf"(def|class) {re.escape(name.split('.')[-1])}\b", text)
        else:                           # a shell script's numbered section comment
            ok = text.startswith("# ")
        if not ok or shown != target:
            wrong.append(f"{target}#L{line} ({name or shown}): {text[:60]!r}")
    assert not wrong, "README links to fix:\n" + "\n".join(wrong)
