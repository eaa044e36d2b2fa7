"""docs/configuration.md is generated from grit_kernels/config.py (``python -m grit_kernels.docs_config``)
and must match it: a GritConfig field added, removed, renamed, re-defaulted or re-described without
regenerating the page fails here."""

import dataclasses

import pytest

from grit_kernels import docs_config
from grit_kernels.config import GritConfig


def test_configuration_page_is_up_to_date():
    page = docs_config.DOC_PATH.read_text(encoding="utf-8")
    assert page == docs_config.render(), (
        "docs/configuration.md is out of date with grit_kernels/config.py: run `python -m grit_kernels.docs_config`"
    )


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(docs_config.render().replace("`update_freq`", "`updatefreq`"), encoding="utf-8")
    assert docs_config.main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    fresh = tmp_path / "fresh.md"
    assert docs_config.main(["--out", str(fresh)]) == 0
    assert docs_config.main(["--check", "--out", str(fresh)]) == 0


def test_every_field_is_on_the_page_with_its_default():
    page = docs_config.DOC_PATH.read_text(encoding="utf-8")
    rows = {name: (default, text) for name, _, default, text in docs_config.field_docs()}
    assert list(rows) == [f.name for f in dataclasses.fields(GritConfig)]
    for name, (default, text) in rows.items():
        assert f"\n### `{name}`\n" in page
        assert text and default in page


def test_help_metadata_wins_over_the_docstring():
    @dataclasses.dataclass
    class Cfg:
        """Doc.

        Attributes:
            alpha: from the docstring,
                continued.
            beta, gamma: shared entry.
            delta: docstring text.
        """

        alpha: int = 1
        beta: float = 0.5
        gamma: str = "x"
        delta: int = dataclasses.field(default=2, metadata={"help": "from metadata"})

    rows = {name: (default, text) for name, _, default, text in docs_config.field_docs(Cfg)}
    assert rows == {
        "alpha": ("`1`", "From the docstring, continued."),
        "beta": ("`0.5`", "Shared entry."),
        "gamma": ("`'x'`", "Shared entry."),
        "delta": ("`2`", "From metadata"),
    }


def test_an_undocumented_field_is_an_error():
    @dataclasses.dataclass
    class Cfg:
        """No attributes section."""

        alpha: int = 1

    with pytest.raises(ValueError, match="alpha has no description"):
        docs_config.field_docs(Cfg)
