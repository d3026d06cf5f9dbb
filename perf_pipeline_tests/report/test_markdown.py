"""Names in the metadata tables show as themselves when the markdown is rendered."""

from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from perf_pipeline.report.markdown import markdown_table

# CommonMark with GitHub's tables, raw HTML allowed: what a renderer of asset metadata does
# at most
RENDERER = MarkdownIt("commonmark").enable("table")
MARKUP = {"em_open", "strong_open", "link_open", "code_inline", "html_inline", "s_open", "image", "softbreak"}


def _cells(table: str) -> list[list]:
    """Each body cell's inline children."""
    tokens = RENDERER.parse(table)
    body = tokens[next(i for i, t in enumerate(tokens) if t.type == "tbody_open"):]
    return [t.children for t in body if t.type == "inline"]


def _text(children) -> str:
    return "".join(c.content for c in children if c.type in ("text", "text_special"))


NAMES = ["tests/test_io.py::test_read[*-<tmp>]", "test_x[a](b)", "test_`code`", "a|b", "__init__",
         "~~gone~~", "C:\\tmp\\*", "test_case_075[1-2]", "**bold**", "<script>alert(1)</script>",
         "[link][ref]", "test & <b>", "x\\|y", "a &amp; b", "&#35;x", "&copy;"]


def test_tricky_names_render_as_themselves():
    cells = _cells(markdown_table(["test", "node"], [(name, "node-1") for name in NAMES]))
    names = cells[0::2]
    assert [_text(c) for c in names] == NAMES
    assert [sorted({c.type for c in cell} & MARKUP) for cell in names] == [[] for _ in NAMES]
    assert [_text(c) for c in cells[1::2]] == ["node-1"] * len(NAMES)


def test_common_names_print_unescaped_for_the_cli():
    table = markdown_table(["test"], [("tests/test_api.py::test_case_7[1-2]",), ("C:\\tmp\\log",)])
    assert "tests/test_api.py::test_case_7[1-2]" in table and "C:\\tmp\\log" in table


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from("ab1_*`~|\\[]()<>/!?&#;:. -"), min_size=1, max_size=30)
       .filter(lambda s: s.strip() == s))
def test_any_printable_name_renders_as_itself(name):
    (cell, _) = _cells(markdown_table(["test", "node"], [(name, "n")]))
    assert _text(cell) == name
    assert not {c.type for c in cell} & MARKUP
